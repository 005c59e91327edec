from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # mailgov's callbacks first: they replace allauth's at the same paths.
    path("accounts/", include("mailgov.contrib.allauth.oauth_urls")),
    path("accounts/", include("allauth.urls")),
    path("mailboxes/", include("mailgov.contrib.allauth.urls")),
    path("", include("project.demo.urls")),
]
