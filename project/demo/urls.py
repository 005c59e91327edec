from django.urls import path

from project.demo import views

app_name = "demo"
urlpatterns = [
    path("", views.home, name="home"),
    path("demo/inbox/", views.inbox, name="inbox"),
    path("demo/inbox/<str:key>/", views.message, name="message"),
    path("demo/send-test/", views.send_test, name="send_test"),
]
