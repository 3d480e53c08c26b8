"""Cursor pagination for every list: `{results, next}`; pass `next` back as `?cursor=` for the next page."""

from __future__ import annotations

import hashlib
from base64 import b64decode, b64encode
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Q, QuerySet
from rest_framework import exceptions
from rest_framework.pagination import BasePagination
from rest_framework.request import Request
from rest_framework.response import Response

from sessions_app.strict_json import ascii_int


class CursorPage(BasePagination):
    """Keyset pages over (the ordering's field, primary key): a cursor names the last row given, and
    the next page starts strictly after it. DRF's CursorPagination paged by the field alone and stepped
    through rows sharing its value with an offset it silently capped at 1,000: past 1,000 sessions
    with one created_at (an import from a system with whole-second times) the same page came back
    forever, its `next` never null."""

    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200
    ordering = "-created_at"  # a view sets its own (one field, "-" for descending) before paginating
    cursor_query_param = "cursor"
    page_size_query_description = "Items per page (1-200, default 50)."
    cursor_query_description = "The `next` value of the previous page, sent with the query that gave it (same ordering and filters)."

    def paginate_queryset(self, queryset: QuerySet, request: Request, view: Any = None) -> list[Any] | None:
        self.request, self.model = request, queryset.model
        size = self.get_page_size(request)
        name, descending = self.ordering.lstrip("-"), self.ordering.startswith("-")
        after = self.decode_cursor(request)
        queryset = queryset.order_by(self.ordering, "-pk" if descending else "pk")
        if after is not None:
            value, pk = after
            beyond = "lt" if descending else "gt"
            # The first condition alone bounds the index range scan; the second leaves out the rows
            # of the cursor's value up to and including the cursor's own.
            queryset = queryset.filter(**{f"{name}__{beyond}e": value}).filter(
                Q(**{f"{name}__{beyond}": value}) | Q(**{name: value, f"pk__{beyond}": pk}))
        rows = list(queryset[: size + 1])
        self.page, self.has_next = rows[:size], len(rows) > size
        return self.page

    def decode_cursor(self, request: Request) -> tuple[Any, Any] | None:
        """(the ordering field's value, the primary key) the page starts after; None for the first page."""
        invalid = exceptions.ValidationError({self.cursor_query_param: ["Invalid cursor."]})
        raw = request.query_params.get(self.cursor_query_param)
        if not raw:
            return None
        # Strictly: a mangled cursor ("%00", one whose "+" became a space) is not the first page again.
        try:
            tokens = parse_qs(b64decode(raw.encode("ascii"), validate=True).decode("ascii"), strict_parsing=True)
        except ValueError:  # (binascii.Error and UnicodeError are ValueErrors)
            raise invalid from None
        if set(tokens) - {"o", "r", "p", "i", "s", "q"} or any(len(values) != 1 for values in tokens.values()):
            raise invalid
        if "p" not in tokens or "i" not in tokens:
            raise exceptions.ValidationError({self.cursor_query_param: [
                "This cursor is not one this service makes (or was made by an earlier version of it): "
                "start the list again without it."]})
        made_for = tokens.get("s", [None])[0]
        if made_for is not None and made_for != self.ordering:
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
        # A forged position must be a 400 here, not a database error in the query.
        position, pk = tokens["p"][0], tokens["i"][0]
        if "\x00" in position or "\x00" in pk:
            raise invalid
        try:
            field = self.model._meta.get_field(self.ordering.lstrip("-"))
            value = field.to_python(position)
            if isinstance(value, datetime):
                value = value.astimezone(UTC)  # (year 1 at +01:00 is out of range: SQLite raised at the query)
            after = value, self.model._meta.pk.to_python(pk)
        except (DjangoValidationError, ValueError, TypeError, OverflowError):
            raise invalid from None
        if any(type(part) is int and not -(2**63) <= part < 2**63 for part in after):
            raise invalid  # (past what the database's integers hold: its error, a 500)
        return after

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        size = ascii_int(raw) if raw is not None else None
        if raw is not None and (size is None or not 1 <= size <= self.max_page_size):
            raise exceptions.ValidationError({self.page_size_query_param: [f"An integer from 1 to {self.max_page_size}."]})
        return size if size is not None else self.page_size

    def get_next_link(self) -> str | None:
        """The cursor after the page's last row, or None on the last page."""
        if not self.has_next or not self.page:
            return None
        last = self.page[-1]
        value = getattr(last, self.ordering.lstrip("-"))
        tokens = {
            "p": value.isoformat() if hasattr(value, "isoformat") else str(value),
            "i": str(last.pk),
            "s": self.ordering,  # the ordering it belongs to (decode_cursor checks)
            "q": self._query_mark(self.request),  # and the list: its address and filters
        }
        # The bare token rather than an absolute URL: correct behind any proxy, and what `?cursor=` takes.
        return b64encode(urlencode(tokens).encode("ascii")).decode("ascii")

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
