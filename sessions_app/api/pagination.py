"""Cursor pagination for every list: `{results, next}`; pass `next` back as `?cursor=` for the next page."""

from __future__ import annotations

import hashlib
from base64 import b64decode, b64encode
from typing import Any
from urllib.parse import parse_qs, urlencode

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from rest_framework import exceptions
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response

from sessions_app.strict_json import ascii_int


class CursorPage(CursorPagination):
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200
    ordering = "-created_at"
    page_size_query_description = "Items per page (1-200, default 50)."
    cursor_query_description = "The `next` value of the previous page, sent with the query that gave it (same ordering and filters)."

    def paginate_queryset(self, queryset: QuerySet, request: Request, view: Any = None) -> list[Any] | None:
        self.model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request: Request) -> Cursor | None:
        invalid = exceptions.ValidationError({self.cursor_query_param: ["Invalid cursor."]})
        raw = request.query_params.get(self.cursor_query_param)
        if raw:
            # DRF's decoding skips what is not base64 and any field it does not know: a mangled
            # cursor ("%00", one whose "+" became a space) quietly meant the first page again.
            try:
                tokens = parse_qs(b64decode(raw.encode("ascii"), validate=True).decode("ascii"), strict_parsing=True)
            except ValueError:  # (binascii.Error and UnicodeError are ValueErrors)
                raise invalid from None
            if set(tokens) - {"o", "r", "p", "s", "q"}:
                raise invalid
            made_for = tokens.get("s", [None])[0]
            if made_for is not None and made_for != ",".join(self.ordering):
                # Its position is a value of the field that list was sorted by: compared with another
                # field it named no place in this list (a client that sent only ?cursor= after asking
                # for ?ordering=created_at got an empty page and no `next`, as if the list had ended).
                raise exceptions.ValidationError({self.cursor_query_param: [
                    f"This cursor continues a list in ordering={made_for[:40]}: send it with the query "
                    "that gave it (the same ordering and filters)."
                ]})
            made_for_query = tokens.get("q", [None])[0]
            if made_for_query is not None and made_for_query != self._query_mark(request):
                # Its position is a place in the list that query gave: with another session's
                # versions or other filters it named a place in a list it never came from.
                raise exceptions.ValidationError({self.cursor_query_param: [
                    "This cursor continues another list (another address or other filters): send it with "
                    "the query that gave it."
                ]})
        try:
            cursor = super().decode_cursor(request)
        except exceptions.NotFound:
            raise invalid from None
        if cursor is not None and cursor.position is not None:
            # A forged position must be a 400 here, not a database error in the query.
            field = self.model._meta.get_field(self.ordering[0].lstrip("-"))
            try:
                field.to_python(cursor.position)
            except (DjangoValidationError, ValueError, TypeError):
                raise invalid from None
            if "\x00" in cursor.position:
                raise invalid
        return cursor

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        size = ascii_int(raw) if raw is not None else None
        if raw is not None and (size is None or not 1 <= size <= self.max_page_size):
            raise exceptions.ValidationError({self.page_size_query_param: [f"An integer from 1 to {self.max_page_size}."]})
        return super().get_page_size(request)

    def encode_cursor(self, cursor: Cursor) -> str:
        # The bare token rather than DRF's absolute URL: correct behind any proxy, and what `?cursor=` takes.
        tokens: dict[str, Any] = {}
        if cursor.offset != 0:
            tokens["o"] = str(cursor.offset)
        if cursor.reverse:
            tokens["r"] = "1"
        if cursor.position is not None:
            tokens["p"] = cursor.position
        tokens["s"] = ",".join(self.ordering)  # the ordering it belongs to (decode_cursor checks)
        tokens["q"] = self._query_mark(self.request)  # and the list: its address and filters
        return b64encode(urlencode(tokens, doseq=True).encode("ascii")).decode("ascii")

    def _query_mark(self, request: Request) -> str:
        """A short mark of the list a cursor belongs to: its path and every query parameter but the
        cursor and the page size (a client may change the page size between pages)."""
        asked = sorted((key, value) for key, values in request.query_params.lists() for value in values
                       if key not in (self.cursor_query_param, self.page_size_query_param))
        return hashlib.blake2b(repr((request.path, asked)).encode(), digest_size=6).hexdigest()

    def get_paginated_response(self, data: Any) -> Response:
        return Response({"results": data, "next": self.get_next_link()})

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["results", "next"],
            "properties": {
                "results": schema,
                "next": {"type": "string", "nullable": True, "description": "Cursor of the next page; null on the last."},
            },
        }

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {"name": self.cursor_query_param, "required": False, "in": "query",
             "description": self.cursor_query_description, "schema": {"type": "string"}},
            {"name": self.page_size_query_param, "required": False, "in": "query",
             "description": self.page_size_query_description,
             "schema": {"type": "integer", "minimum": 1, "maximum": self.max_page_size}},
        ]
