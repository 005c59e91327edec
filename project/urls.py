from django.contrib import admin
from django.urls import include, path

from mailgov.health import LivenessView, ReadinessView
from project.monitoring import protected_metrics

# The demo owns its admin site, so it says what the site is for. mailgov
# itself never renames a host's admin: it adds its section to the index.
admin.site.site_header = "Mail governance"
admin.site.site_title = "Mail governance"
admin.site.index_title = "Mail governance portal"

urlpatterns = [
    path("admin/", admin.site.urls),
    # Probes and the Prometheus scrape. In production serve these to the
    # orchestrator and the monitoring network only (README, "Deploying").
    path("health/live", LivenessView.as_view(), name="health-live"),
    path("health/ready", ReadinessView.as_view(), name="health-ready"),
    # django-prometheus's export view, plus mailgov's database gauges once
    # per scrape under PROMETHEUS_MULTIPROC_DIR (mailgov.metrics.export),
    # behind a token and/or an address allowlist (project.monitoring).
    path("metrics", protected_metrics, name="prometheus-django-metrics"),
    # mailgov's callbacks first: they replace allauth's at the same paths.
    path("accounts/", include("mailgov.contrib.allauth.oauth_urls")),
    path("accounts/", include("allauth.urls")),
    path("mailboxes/", include("mailgov.contrib.allauth.urls")),
    path("", include("project.demo.urls")),
]
