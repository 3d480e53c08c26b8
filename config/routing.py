"""WebSocket routes (live updates for the dashboard's htmx ws extension)."""

from django.urls import path

from sessions_app import consumers
from snapshots_app.consumers import SessionTimelineConsumer

websocket_urlpatterns = [
    path("ws/projects/<slug:project_slug>/", consumers.ProjectEventsConsumer.as_asgi()),
    path("ws/sessions/<uuid:session_id>/", SessionTimelineConsumer.as_asgi()),
]
