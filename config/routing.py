"""WebSocket routes (live updates)."""

from django.urls import path

from sessions_app import consumers

websocket_urlpatterns = [
    path("ws/projects/<slug:project_slug>/", consumers.ProjectEventsConsumer.as_asgi()),
]
