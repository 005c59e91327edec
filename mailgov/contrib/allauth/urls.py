"""mailgov's consent URLs, and allauth's callbacks replaced (include before allauth.urls)::

path("accounts/", include("mailgov.contrib.allauth.oauth_urls")),
path("accounts/", include("allauth.urls")),
path("mailboxes/", include("mailgov.contrib.allauth.urls")),
"""

from django.urls import path

from mailgov.contrib.allauth import views

app_name = "mailgov"
urlpatterns = [
    path("", views.mailboxes, name="mailboxes"),
    path("my-data.json", views.my_data, name="my_data"),
    path("protection/", views.protection, name="protection"),
    path("not-connected/", views.consent_error, name="consent_error"),
    path("connect/<str:capability_id>/<str:provider_id>/", views.consent, name="consent"),
    path("<uuid:pk>/disconnect/", views.disconnect, name="disconnect"),
    path("<uuid:pk>/keep/", views.keep, name="keep"),
]
