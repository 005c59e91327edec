"""URLs in the wrong order: allauth's callbacks win (for the E032 check's test)."""

from django.urls import include, path

urlpatterns = [
    path("accounts/", include("allauth.urls")),
    path("accounts/", include("mailgov.contrib.allauth.oauth_urls")),
    path("mailboxes/", include("mailgov.contrib.allauth.urls")),
]
