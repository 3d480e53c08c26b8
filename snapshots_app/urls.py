from django.urls import path

app_name = "snapshots"

urlpatterns: list = [
]
