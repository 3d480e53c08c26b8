"""Django's CommonMiddleware, with a missing trailing slash redirected without changing the request."""

from __future__ import annotations

from django.http import HttpRequest
from django.http.response import HttpResponseBase, HttpResponseRedirectBase
from django.middleware import common
from django.utils.http import escape_leading_slashes


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
