"""JSON in and out with orjson: state bodies can be megabytes, and they are parsed exactly once."""

from __future__ import annotations

import json
from typing import Any

import orjson
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.http import Http404
from rest_framework.exceptions import NotAcceptable, ParseError
from rest_framework.metadata import BaseMetadata
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.renderers import BaseRenderer

from sessions_app.api.problems import PROBLEM_CONTENT_TYPE, RequestTooLarge
from sessions_app.errors import InvalidState, StateTooDeep
from sessions_app.strict_json import decode_error_words, refuse_duplicate_keys, refuse_huge_integers


class OrjsonParser(BaseParser):
    media_type = "application/json"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        data = stream.read(limit + 1) if stream is not None else b""
        if limit is not None and len(data) > limit:
            raise RequestTooLarge()
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            if "UTF-8" in str(exc):  # orjson's "str is not valid UTF-8: surrogates not allowed"
                raise ParseError("The request body is not valid JSON: it must be UTF-8 encoded.") from None
            if str(exc).startswith("depth limit exceeded"):  # past orjson's 1,024 levels
                # The code a state nested 201 levels deep gets: engines branch on it, not on the depth.
                raise StateTooDeep(f"the request body nests deeper than 1,024 levels; a state may nest at most "
                                   f"{settings.STATE_MAX_DEPTH}", limit=settings.STATE_MAX_DEPTH) from None
            raise ParseError(f"The request body is not valid JSON: {decode_error_words(exc, data)}") from None
        try:
            refuse_huge_integers(data)
            refuse_duplicate_keys(data, what="the request body", value=value)
        except InvalidState as exc:
            raise ParseError(f"{exc.message[:1].upper()}{exc.message[1:]}.") from None
        return value


def _default(value: Any) -> Any:
    # Lazy translation strings in DRF's messages.
    return str(value)


class OrjsonRenderer(BaseRenderer):
    media_type = "application/json"
    format = "json"
    charset = None

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        if data is None:
            return b""
        try:
            return orjson.dumps(data, default=_default, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z)
        except TypeError:
            # PostgreSQL's jsonb keeps numbers as numeric: a float such as 1e25 in metadata comes back
            # as a 26-digit integer, beyond orjson's 64 bits. The standard library writes it exactly.
            return json.dumps(data, cls=DjangoJSONEncoder, ensure_ascii=False, separators=(",", ":")).encode()


class NameOnlyMetadata(BaseMetadata):
    """OPTIONS answers with the allowed methods (Allow header) and a name; the OpenAPI schema is
    the description of inputs, so DRF's per-serializer form metadata is not repeated here."""

    def determine_metadata(self, request: Any, view: Any) -> dict[str, Any]:
        return {"name": view.get_view_name(), "schema": "/api/v1/schema/"}


class ContentNegotiation(DefaultContentNegotiation):
    """DRF's, but a `?format=` no renderer has is 406 (as an Accept header none matches is), not a 404
    that said an existing session or list was not there; and `Accept: application/problem+json` (what
    RFC 9457 has clients send to say they read problems) is taken as JSON, whose errors are problems:
    alone, it was a 406 hiding the error asked about."""

    def get_accept_list(self, request: Any) -> list[str]:
        accepted: list[str] = super().get_accept_list(request)
        return [token.replace(PROBLEM_CONTENT_TYPE, "application/json") for token in accepted]

    def filter_renderers(self, renderers: list[BaseRenderer], format: str) -> list[BaseRenderer]:
        try:
            return super().filter_renderers(renderers, format)  # type: ignore[no-any-return]
        except Http404:
            formats = ", ".join(sorted({str(renderer.format) for renderer in renderers}))
            raise NotAcceptable(f"No format {format[:40]!r} here; this answers in {formats}.") from None
