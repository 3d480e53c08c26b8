"""Declarative query-parameter filters: each one both filters the queryset and documents itself in
the OpenAPI schema, so the two cannot drift apart. Bad values are 400, never silently ignored."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connection
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework import exceptions
from rest_framework.filters import BaseFilterBackend
from rest_framework.request import Request

from sessions_app.models import SessionStatus
from sessions_app.strict_json import flag


def parse_bool(name: str, raw: str) -> bool:
    value = flag(raw)
    if value is None:
        raise exceptions.ValidationError({name: ["Use true or false."]})
    return value


def parse_when(name: str, raw: str) -> datetime:
    try:
        value = parse_datetime(raw.strip())
    except ValueError:
        value = None
    try:
        if value is None:
            raise ValueError
        # In UTC: PostgreSQL refuses some offsets ISO 8601 allows (e.g. +18:15).
        return value.astimezone(UTC) if timezone.is_aware(value) else timezone.make_aware(value, UTC)
    except (ValueError, OverflowError):
        raise exceptions.ValidationError({name: ["An ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z."]}) from None


def parse_choice(name: str, raw: str, choices: list[str]) -> str:
    if raw not in choices:
        raise exceptions.ValidationError({name: [f"One of {', '.join(choices)}."]})
    return raw


def tag_q(field: str, tag: str) -> Q:
    if connection.vendor == "postgresql":
        return Q(**{f"{field}__contains": [tag]})
    # SQLite has no JSON containment; the quoted tag in the JSON text is exact enough for a filter.
    return Q(**{f"{field}__icontains": f'"{tag}"'})


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str
    # apply(queryset, raw), or with `with_request` apply(queryset, raw, request, view): a filter that asks
    # who asks, and what the view lets them do.
    apply: Callable[..., QuerySet]
    with_request: bool = False


def text_param(name: str, description: str, apply: Callable[[QuerySet, str], QuerySet]) -> Param:
    return Param(name, {"type": "string", "maxLength": 255}, description, apply)


def bool_param(name: str, description: str, field: Callable[[bool], Q]) -> Param:
    return Param(name, {"type": "boolean"}, description, lambda qs, raw: qs.filter(field(parse_bool(name, raw))))


def choice_param(name: str, description: str, choices: list[str], lookup: str) -> Param:
    return Param(
        name, {"type": "string", "enum": choices}, description,
        lambda qs, raw: qs.filter(**{lookup: parse_choice(name, raw, choices)}),
    )


def range_params(field: str, noun: str) -> list[Param]:
    return [
        Param(f"{noun}_after", {"type": "string", "format": "date-time"}, f"Only those {noun} at or after this time.",
              lambda qs, raw: qs.filter(**{f"{field}__gte": parse_when(f"{noun}_after", raw)})),
        Param(f"{noun}_before", {"type": "string", "format": "date-time"}, f"Only those {noun} before this time.",
              lambda qs, raw: qs.filter(**{f"{field}__lt": parse_when(f"{noun}_before", raw)})),
    ]


# What every list takes besides its filters: its page (see CursorPage) and DRF's ?format=.
LIST_QUERY_PARAMS = frozenset({"cursor", "limit", "format"})


def refuse_unknown_query_params(request: Request, taken: Collection[str], *, what: str, write: bool = False) -> None:
    """A query parameter the endpoint does not take (DRF's ?format= it always takes), or one it takes
    given more than once, is a 400 naming it, as an unknown body field is: ignored, a misspelt filter
    (?stauts=failed) answered the whole list, and a script acting on each result acted on every one;
    a misspelt ?structual_strings=false on a diff answered another diff than the one asked for.
    (ApiView.initial calls it for every request.)"""
    unknown = sorted(name for name in request.query_params if name not in taken and name != "format")
    # One value each: given twice, the last one won in silence (?status=running&status=failed listed the
    # failed sessions alone, a diff's second ?from= diffed another version than the first one named).
    repeated = sorted(name for name, values in request.query_params.lists() if len(values) > 1 and name in taken)
    if repeated:
        raise exceptions.ValidationError(
            {name[:100]: ["Given more than once; it takes one value."] for name in repeated[:20]}
        )
    if unknown:
        listed = ", ".join(sorted(set(taken) - {"format"}))
        takes = f"takes {listed}" if listed else "takes no query parameters"
        if write and not listed:
            takes += " (its input goes in its JSON body)"
        raise exceptions.ValidationError(
            {name[:100]: [f"Unknown query parameter; {what} {takes}."] for name in unknown[:20]}
        )


class ParamFilter(BaseFilterBackend):
    """Applies the view's `filter_params`; a view that has it is a list, whose reads take these, its
    page and any other parameter it names in `query_params` (ApiView.query_params_taken), and nothing else."""

    def filter_queryset(self, request: Request, queryset: QuerySet, view: Any) -> QuerySet:
        for param in getattr(view, "filter_params", []):
            raw = request.query_params.get(param.name)
            if raw is not None:
                if "\x00" in raw:
                    raise exceptions.ValidationError({param.name: ["Must not contain NUL."]})
                if len(raw) > param.schema.get("maxLength", 255):
                    raise exceptions.ValidationError({param.name: ["Too long."]})
                queryset = param.apply(queryset, raw, request, view) if param.with_request else param.apply(queryset, raw)
        return queryset

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {"name": p.name, "in": "query", "required": False, "description": p.description, "schema": p.schema}
            for p in getattr(view, "filter_params", [])
        ]


SESSION_STATUSES = list(SessionStatus.values)


def parse_uuid(name: str, raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise exceptions.ValidationError({name: ["Must be a valid UUID."]}) from None


def ordering_param(choices: list[str]) -> Param:
    """Validated here; the view hands the value to its cursor paginator, which does the sorting."""

    def validate(queryset: QuerySet, raw: str) -> QuerySet:
        parse_choice("ordering", raw, choices)
        return queryset

    return Param("ordering", {"type": "string", "enum": choices}, f"Sort order (default {choices[0]}).", validate)
