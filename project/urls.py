from django.contrib import admin
from django.urls import include, path

# The demo owns its admin site, so it says what the site is for. mailgov
# itself never renames a host's admin: it adds its section to the index.
admin.site.site_header = "Mail governance"
admin.site.site_title = "Mail governance"
admin.site.index_title = "Mail governance portal"

urlpatterns = [
    path("admin/", admin.site.urls),
    # mailgov's callbacks first: they replace allauth's at the same paths.
    path("accounts/", include("mailgov.contrib.allauth.oauth_urls")),
    path("accounts/", include("allauth.urls")),
    path("mailboxes/", include("mailgov.contrib.allauth.urls")),
    path("", include("project.demo.urls")),
]
