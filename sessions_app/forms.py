"""Dashboard input read through Django forms: a forms.CharField already refuses NUL characters
(PostgreSQL text cannot hold them) and the form names the field that was wrong."""

from __future__ import annotations

import hashlib
import ipaddress
import unicodedata
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.forms.utils import pretty_name
from django.http import QueryDict
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from sessions_app.models import SessionStatus
from sessions_app.selectors import SessionFilters, session_cursor_valid
from sessions_app.strict_json import flag


def form_problems(form: forms.Form) -> list[str]:
    """One line per bad field, named as a person reads it ("Updated from: Not a moment…", not the
    query's updated_from), for a page to show."""
    return [
        f"{_label(form, name)}{' '.join(str(message) for message in messages)}" for name, messages in form.errors.items()
    ]


def _label(form: forms.Form, name: str) -> str:
    if name not in form.fields:  # NON_FIELD_ERRORS (__all__) too
        return ""
    return f"{form.fields[name].label or pretty_name(name)}: "


WHEN_HELP = "a date (2026-01-31) or an ISO 8601 date-time (2026-01-31T12:00:00Z)"


def parse_moment(raw: str, *, end_of_day: bool = False) -> datetime | None:
    """A date or date-time typed into a filter, in UTC; None when empty; ValidationError when it
    names no moment (month 13, February 30th, hour 25) or one PostgreSQL cannot hold."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        # A day first: parse_datetime() also reads "2026-01-31", as midnight, which would drop that
        # day from an "updated to" range.
        day = parse_date(raw)
        moment: datetime | None
        if day is not None and end_of_day and day == date.max:
            moment = datetime.max  # (the day after 9999-12-31 is past what a datetime holds)
        elif day is not None:
            moment = datetime.combine(day, time.min) + timedelta(days=1 if end_of_day else 0)
        else:
            moment = parse_datetime(raw)
        if moment is None:
            raise ValueError(raw)
        # In UTC, as the database compares: year 1 at +14:00 lies before year 1 there.
        return moment.astimezone(UTC) if timezone.is_aware(moment) else timezone.make_aware(moment, UTC)
    except (ValueError, OverflowError):
        raise forms.ValidationError(f"Not a moment: use {WHEN_HELP}.", code="invalid") from None


class QueryForm(forms.Form):
    """A page's query string as a form: a parameter given twice is an error naming it (the last one
    won in silence: `?status=failed&status=running` listed the running sessions), as in the API."""

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = self.cleaned_data
        if isinstance(self.data, QueryDict):
            for name in self.fields:
                if len(self.data.getlist(name)) > 1:
                    self.add_error(name, "Given more than once: give it once.")
        return data


class SessionFilterForm(QueryForm):
    """The session list's query string. Text that cannot be searched for, dates that name no day,
    choices the list does not have and a mangled cursor are errors: the list fell back to its default
    for a misspelt `?status=faild`, and a link shared as "the failed sessions" listed all of them."""

    q = forms.CharField(required=False)
    status = forms.CharField(required=False)
    workflow = forms.CharField(required=False)
    tag = forms.CharField(required=False)
    # The metaclass moves fields off the class, so this does not hide BaseForm.has_error(); mypy cannot know.
    has_error = forms.CharField(required=False)  # type: ignore[assignment]
    updated_from = forms.CharField(required=False)
    updated_to = forms.CharField(required=False)
    sort = forms.CharField(required=False)
    after = forms.CharField(required=False, strip=False)
    project = forms.CharField(required=False)

    def clean_status(self) -> str:
        return _choice(self.cleaned_data["status"], SessionStatus.choices)

    def clean_has_error(self) -> str:
        # Also true/false (and 1/0) as the timeline and the API read them: a link written for one was a
        # 400 on the other.
        raw = self.cleaned_data["has_error"]
        value = flag(raw) if raw else None
        raw = raw if value is None else "yes" if value else "no"
        return _choice(raw, [("yes", "has an error"), ("no", "has none")], also="true and false say the same")

    def clean_sort(self) -> str:
        return _choice(self.cleaned_data["sort"], SESSION_SORT_CHOICES)

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean()
        if data.get("after") and "sort" in data and not session_cursor_valid(data["after"], data["sort"]):
            # Listed from the top instead, "Load more" added the first page's rows again below the last.
            self.add_error("after", "Not a place in this list (a link cut short?): open the list again from the top.")
        return data

    def clean_updated_from(self) -> datetime | None:
        return parse_moment(self.cleaned_data["updated_from"])

    def clean_updated_to(self) -> datetime | None:
        return parse_moment(self.cleaned_data["updated_to"], end_of_day=True)

    def filters(self) -> SessionFilters:
        """The filters asked for; on an invalid form, the valid ones (so the page shows them as they were)."""
        data: dict[str, Any] = self.cleaned_data
        text = {name: str(data.get(name) or "") for name in ("q", "status", "workflow", "tag", "has_error", "sort")}
        return SessionFilters(
            q=text["q"][:200],
            status=text["status"],  # (clean_status and the others let only their choices through)
            workflow=text["workflow"][:200],
            tag=text["tag"][:64],
            has_error=text["has_error"],
            updated_from=data.get("updated_from"),
            updated_to=data.get("updated_to"),
            sort=text["sort"] or "-updated",
        )


# The list's orders as its picker words them (the query spells them as SESSION_SORTS does).
SESSION_SORT_CHOICES = [("-updated", "Recently updated"), ("updated", "Least recently updated"),
                        ("-created", "Newest"), ("external_id", "External id")]


def _choice(raw: str, choices: list[tuple[str, str]], *, also: str = "") -> str:
    """`raw` if it is one of the (value, words) choices or empty; else an error naming each choice as
    the address spells it and as the page's picker words it ("Not one of true, false." named neither
    the picker's "Has error" nor the yes it sends)."""
    if raw and raw not in {value for value, _ in choices}:
        named = ", ".join(f"{value} ({str(words).lower()})" for value, words in choices)
        raise forms.ValidationError(f"{raw[:40]!r} is not one of {named}{f'; {also}' if also else ''}.",
                                    code="invalid_choice")
    return raw


class ThrottledSignInMixin:
    """Sign-in that stops a password-guessing run: LOGIN_FAILURES_MAX failures for one username from
    one address (five times that from one address over all usernames) within LOGIN_LOCKOUT_SECONDS
    refuse further attempts, even with the right password, until the window passes. A success
    clears its username's count. Counters live in the cache, so they are shared by every process."""

    request: Any
    data: Any
    user_cache: Any

    def clean(self) -> dict[str, Any]:
        limit = settings.LOGIN_FAILURES_MAX
        if not limit:
            return super().clean()  # type: ignore[misc,no-any-return]
        keys = self._throttle_keys()
        # Counted before the password is checked, and taken back unless it turns out wrong: counted
        # after, attempts sent at once all saw the count of before any of them failed, and each
        # checked a password however far over the limit they went.
        counts = [self._count(key) for key in keys]
        if counts[0] > limit or counts[1] > 5 * limit:
            self._uncount(keys)
            minutes = -(-settings.LOGIN_LOCKOUT_SECONDS // 60)
            raise forms.ValidationError(
                f"Too many failed sign-ins; try again in {minutes} minute{'s' if minutes != 1 else ''}.",
                code="throttled",
            )
        try:
            cleaned: dict[str, Any] = super().clean()  # type: ignore[misc]
        except forms.ValidationError as exc:
            # Only a wrong password counts: not a form error, nor the right password of an account
            # this form refuses (the admin's answer to a non-staff user, given as "invalid_login").
            if getattr(exc, "code", None) != "invalid_login" or self.user_cache is not None:
                self._uncount(keys)
            raise
        if self.user_cache is None:  # no password was checked (a field was left empty)
            self._uncount(keys)
        else:
            cache.delete(keys[0])
            self._uncount(keys[1:])
        return cleaned

    @staticmethod
    def _count(key: str) -> int:
        # add() starts the window; incr() keeps it (the first failure's expiry counts).
        cache.add(key, 0, settings.LOGIN_LOCKOUT_SECONDS)
        try:
            return int(cache.incr(key))
        except ValueError:  # expired between the two calls
            cache.set(key, 1, settings.LOGIN_LOCKOUT_SECONDS)
            return 1

    @staticmethod
    def _uncount(keys: tuple[str, ...]) -> None:
        for key in keys:
            try:
                cache.decr(key)
            except ValueError:  # its window ended meanwhile
                pass

    def _throttle_keys(self) -> tuple[str, str]:
        address = _client_network((self.request.META.get("REMOTE_ADDR") or "") if self.request is not None else "")
        # As the form's field reads it (NFKC: fullwidth letters sign in as plain ones), so that no other
        # spelling of a name gets an allowance of its own.
        username = unicodedata.normalize("NFKC", str(self.data.get("username", ""))).strip().casefold()
        # Hashed: a cache key of any characters and length, whatever was typed.
        named = hashlib.sha256(f"{address}\n{username}".encode()).hexdigest()[:40]
        return f"sign-in-failures:{named}", f"sign-in-failures:{address}"


def _client_network(address: str) -> str:
    """The client as the sign-in limit counts it: an IPv4 address, or an IPv6 address's /64 (what one
    host or home usually holds: counted per address, each guess could come from a fresh one)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SignInForm(ThrottledSignInMixin, AuthenticationForm):
    """The dashboard's sign-in (accounts/login/)."""


class AdminSignInForm(ThrottledSignInMixin, AdminAuthenticationForm):
    """The admin's sign-in: staff only, as Django's."""
