"""One ASGI application serving HTTP (Django) and WebSocket (Channels) from the same process."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from config.startup import settings_or_exit

settings_or_exit()

from django.core.asgi import get_asgi_application  # noqa: E402

# Django must be set up before the consumers (and the models they use) are imported.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from config.middleware import SocketDatabaseGuard  # noqa: E402
from config.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(SocketDatabaseGuard(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))),
    }
)
