"""A URLconf where mailgov serves allauth's callbacks but allauth serves its own
login routes (which let ``?scope=`` and ``?auth_params=`` widen a sign-in):
``mailgov.E032`` must fire (see ``tests/test_consent.py``)."""

from django.urls import include, path

from mailgov.contrib.allauth import oauth_urls

urlpatterns = [
    path(
        "accounts/",
        include([p for p in oauth_urls.urlpatterns if p.name.endswith("_callback")]),
    ),
    path("accounts/", include("allauth.urls")),
    path("mailboxes/", include("mailgov.contrib.allauth.urls")),
]
