"""The django-allauth integration: consent pages, token capture, end-user pages.

Add ``"mailgov.contrib.allauth"`` to ``INSTALLED_APPS`` (before
``"allauth"``), set ``SOCIALACCOUNT_ADAPTER`` to
``"mailgov.contrib.allauth.adapter.MailgovSocialAccountAdapter"``, keep
``SOCIALACCOUNT_STORE_TOKENS = False``, and include
``mailgov.contrib.allauth.urls`` *before* ``allauth.urls``: it replaces
allauth's OAuth2 callbacks with ones that keep the granted ``scope`` of the
token response, which allauth drops.
"""
