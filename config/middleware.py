"""Our middleware: trailing-slash redirects that keep the request, the CSP header, a sign-in asked for
mid-action that leads back to the page, static files streamed under ASGI, a page for a form's address
visited, and, while the database is unreachable, a 503 page and live-update sockets closed without a traceback."""

from __future__ import annotations

import io
import logging
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from django.db import InterfaceError, OperationalError
from django.http import FileResponse, HttpRequest, HttpResponse
from django.http.response import HttpResponseBase, HttpResponseRedirectBase
from django.middleware import common
from django.shortcuts import resolve_url
from django.template.loader import render_to_string
from django.utils.deprecation import MiddlewareMixin
from django.utils.http import escape_leading_slashes, url_has_allowed_host_and_scheme
from whitenoise.middleware import WhiteNoiseMiddleware

from config.files import file_chunks
from sessions_app.errors import first_line

logger = logging.getLogger(__name__)
CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455 7.4.1 (IANA): the server is overloaded or a dependency is down


def on_this_site(request: HttpRequest, url: str) -> bool:
    """Whether `url` (a Referer, HX-Current-URL) is one of this site's pages, safe to send a user back to."""
    return url_has_allowed_host_and_scheme(url, allowed_hosts={request.get_host()}, require_https=request.is_secure())


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, whose files are read by an async iterator under ASGI (the server the web process
    runs). Django reads a synchronous file iterator there whole, in a thread, before the first byte goes
    out, and warns so once per process ("StreamingHttpResponse must consume synchronous iterators"):
    the one warning `make run` printed, which read like an error to a newcomer."""

    @staticmethod
    def serve(static_file: Any, request: HttpRequest) -> FileResponse:
        response: FileResponse = WhiteNoiseMiddleware.serve(static_file, request)
        if isinstance(request, ASGIRequest):
            # No file for a HEAD or a 304: an empty one, or its empty iterator warns the same. (A file
            # stays among the response's resources: it is closed with the response too.)
            response.streaming_content = file_chunks(response.file_to_stream or io.BytesIO())
        return response


class PermanentRedirectKeepingMethod(HttpResponseRedirectBase):
    """308 (RFC 9110 15.4.9): the client repeats the same method with the same body at the new URL."""

    status_code = 308


class CommonMiddleware(common.CommonMiddleware):
    """APPEND_SLASH answers a write with 308, not 301. After a 301, clients repeat a POST as a GET
    (requests, curl -L, browsers) and drop a PATCH or PUT's body (requests): a snapshot POSTed to
    `/api/v1/sessions/<id>/versions` came back 200 with the version list, and nothing was written."""

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if request.method not in ("GET", "HEAD") and response.status_code == 404 and self.should_redirect_with_slash(request):
            # (Django's own path raises in DEBUG for such a request, since a 301 could not keep its body.)
            return PermanentRedirectKeepingMethod(escape_leading_slashes(request.get_full_path(force_append_slash=True)))
        return super().process_response(request, response)


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    """Sends CONTENT_SECURITY_POLICY (settings) as the Content-Security-Policy header of every response
    that has none of its own. `{host}` in it stands for the request's host, so that `connect-src` can
    name the same host's WebSocket URLs (browsers that predate CSP 3 do not match ws:/wss: with 'self').
    Empty: no header. (MiddlewareMixin: it runs in the ASGI request's own flow, no thread hop.)"""

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        policy: str = settings.CONTENT_SECURITY_POLICY
        if policy and "Content-Security-Policy" not in response:
            if "{host}" in policy:
                try:
                    host = request.get_host()
                except DisallowedHost:  # (answered 400 already)
                    host = ""
                if host and not host.startswith("["):
                    policy = policy.replace("{host}", host)
                else:  # no source names it (CSP has no syntax for an IPv6 address; 'self' covers it in CSP 3)
                    policy = " ".join(word for word in policy.split(" ") if "{host}" not in word)
            response["Content-Security-Policy"] = policy
        return response


class SignInAgainMiddleware(MiddlewareMixin):
    """A click whose sign-in had ended (the browser session expired, or was ended in another tab) is
    sent to sign in and then back to the page it was made on. login_required sent it back to the
    address the click requested instead: an htmx action (pin, label) followed that redirect and
    swapped the whole sign-in page into the timeline row, and a plain form sent to a POST-only
    address (pin without JavaScript, unarchive) came back after signing in as a GET of it, a bare 405.
    The page is HX-Current-URL for htmx, the Referer for a form; only one of this site's pages."""

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if response.status_code != 302 or getattr(request, "user", None) is None or request.user.is_authenticated:
            return response
        login = resolve_url(settings.LOGIN_URL)
        if urlsplit(response.get("Location", "")).path != login:
            return response
        if request.resolver_match is not None and request.resolver_match.url_name == "logout":
            return response  # a sign-out asked for: its page says so (LOGOUT_REDIRECT_URL), not "sign in to go back"
        htmx = request.headers.get("HX-Request") == "true"
        if not htmx and request.method in ("GET", "HEAD"):
            return response  # (a page asked for again after signing in shows what it showed)
        page = self._page(request, request.headers.get("HX-Current-URL" if htmx else "Referer", ""))
        if page is None:
            return response
        again = redirect_to_login(page, login)
        if not htmx:
            return again
        answer = HttpResponse(status=200)
        answer["HX-Redirect"] = again["Location"]  # a full page load: a redirect would be followed and swapped in
        return answer

    @staticmethod
    def _page(request: HttpRequest, url: str) -> str | None:
        if not on_this_site(request, url):
            return None
        parts = urlsplit(url)
        if parts.path == resolve_url(settings.LOGIN_URL):
            return None
        return parts.path + (f"?{parts.query}" if parts.query else "")


class MethodNotAllowedPageMiddleware(MiddlewareMixin):
    """A dashboard address that takes only a form's POST (sign out, pin, unarchive), visited, bookmarked
    or reloaded, answered Django's bare 405: a blank page, or the browser's "HTTP ERROR 405". It says
    what the address is (signing out offers its button) and leads back. The API has its own problems."""

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if (response.status_code != 405 or not isinstance(response, HttpResponse) or response.content
                or request.path.startswith("/api/")
                or request.headers.get("HX-Request") == "true" or request.method == "HEAD"):
            return response
        page = HttpResponse(render_to_string("405.html", request=request), status=405)
        page["Allow"] = response.get("Allow", "")
        return page


class DatabaseUnavailableMiddleware(MiddlewareMixin):
    """A page whose database is unreachable (down, restarting, the pool timed out) answers 503 saying
    so, with Retry-After, as the API does (sessions_app.api.problems), and logs one line. It was a 500
    "Server error ... it has been logged" with a traceback per request, so an operator could not tell
    an outage from a bug, and a database restart filled the log with one traceback per page view."""

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponseBase | None:
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        from sessions_app.api.problems import DATABASE_RETRY_AFTER  # (imported with the API's settings)

        logger.warning("database unavailable in %s: %s", request.path, first_line(exception))
        response = HttpResponse(render_to_string("503.html"), status=503)
        response["Retry-After"] = str(DATABASE_RETRY_AFTER)
        return response


class SocketDatabaseGuard:
    """ASGI middleware for the live-update sockets: a socket whose database is unreachable (its
    session and user are read before the consumer runs, then on each check) is closed with one log
    line, not an "Exception in ASGI application" traceback. An open page retries its socket with
    backoff through a database restart, each try a traceback (and a 500 handshake); once a socket
    opens again the page reloads (static/js/app.js). Failures are counted (sessions_app.background.
    OutageLog) and the first socket accepted after them says so."""

    def __init__(self, app: Any) -> None:
        from sessions_app.background import OutageLog

        self.app = app
        self.failures = OutageLog(logger, "live-update sockets (database)")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        accepted = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal accepted
            if message.get("type") == "websocket.accept":
                accepted = True
                self.failures.succeeded()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except (OperationalError, InterfaceError) as exc:
            self.failures.failed(exc, f"socket {scope.get('path', '')} {'closed' if accepted else 'refused'}")
            try:  # refused before its handshake ends (a 403), or closed: "try again later"
                await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER})
            except Exception:  # noqa: BLE001 - the socket is gone already
                pass
