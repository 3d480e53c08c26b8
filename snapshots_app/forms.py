"""The dashboard's and the admin's write forms. Django's forms.CharField refuses NUL characters
(PostgreSQL text cannot hold them), so bad input is a field error on the page, never a 500; the
services stay the authority on what may be stored (a required reason, lengths after stripping)."""

from __future__ import annotations

from datetime import datetime

from django import forms
from django.utils.dateparse import parse_date, parse_datetime

from sessions_app.forms import WHEN_HELP, QueryForm, parse_moment
from sessions_app.services import REASON_MAX
from sessions_app.strict_json import ascii_int, flag
from snapshots_app.models import TIMELINE_KINDS, VersionKind
from snapshots_app.selectors import TimelineFilters
from snapshots_app.services import MAX_TRIM_KEEP, METADATA_LIMITS


def _text(max_length: int) -> forms.CharField:
    # Not stripped here: the services strip, and say so when nothing is left.
    return forms.CharField(required=False, max_length=max_length, strip=False)


def _request_key() -> forms.CharField:
    # The confirm page's one-time key (the API's Idempotency-Key): a double click acts once.
    return forms.CharField(required=False, max_length=METADATA_LIMITS["idempotency_key"])


class RewindForm(forms.Form):
    reason = _text(REASON_MAX)
    expected_version = forms.IntegerField(required=False, min_value=0)
    request_key = _request_key()


class ReasonForm(forms.Form):
    reason = _text(REASON_MAX)


class TrimForm(forms.Form):
    keep_newest = forms.IntegerField(
        min_value=1, max_value=MAX_TRIM_KEEP, label="Versions to keep",
        error_messages={"required": "Say how many of the newest versions to keep (at least 1: the head)."},
    )
    reason = _text(REASON_MAX)
    expected_version = forms.IntegerField(required=False, min_value=0)


class ForkForm(forms.Form):
    external_id = forms.CharField(required=False, max_length=255)
    reason = _text(REASON_MAX)
    request_key = _request_key()


class MarkForm(forms.Form):
    pinned = forms.ChoiceField(required=False, choices=[("0", "unpin"), ("1", "pin")])
    label = _text(METADATA_LIMITS["label"])


class TimelineFilterForm(QueryForm):
    """The timeline's filters, from its address (the filter form's GET, a shared link, the live
    socket's URL). A checkbox sends "true" (the API's spelling). A value the timeline does not know is
    an error naming it, as on the session list: `?kind=bogus` showed every version under a link that
    named a filter, and `?pinned=maybe` the pinned ones. The live socket takes the valid ones."""

    # The metaclass moves fields off the class, so this does not hide BaseForm.has_error(); mypy cannot know.
    has_error = forms.CharField(required=False, label="With an error")  # type: ignore[assignment]
    pinned = forms.CharField(required=False, label="Pinned")
    labelled = forms.CharField(required=False, label="Labelled")
    kind = forms.CharField(required=False)
    before = forms.CharField(required=False, label="Before")

    def _flag(self, name: str) -> bool:
        raw = self.cleaned_data[name]
        value = flag(raw) if raw else False
        if value is None:
            raise forms.ValidationError(f"{raw[:40]!r} is not one of true, false.", code="invalid_choice")
        return value

    def clean_has_error(self) -> bool:
        return self._flag("has_error")

    def clean_pinned(self) -> bool:
        return self._flag("pinned")

    def clean_labelled(self) -> bool:
        return self._flag("labelled")

    def clean_kind(self) -> str:
        raw = self.cleaned_data["kind"]
        if raw and raw not in VersionKind.values:
            raise forms.ValidationError(f"{raw[:40]!r} is not one of {', '.join(TIMELINE_KINDS)}.", code="invalid_choice")
        # A kind the filter no longer offers (step, import: older links) reads as any kind, and the
        # page's kind picker says so.
        return str(raw) if raw in TIMELINE_KINDS else ""

    def clean_before(self) -> int | None:
        raw = self.cleaned_data["before"]
        number = ascii_int(raw)
        if raw and number is None:
            raise forms.ValidationError(f"{raw[:40]!r} is not a version number.", code="invalid")
        return number

    def filters(self) -> TimelineFilters:
        self.is_valid()  # (a field that is wrong, say a NUL byte in kind, leaves the others in cleaned_data)
        data = self.cleaned_data
        return TimelineFilters(
            has_error=bool(data.get("has_error")), pinned=bool(data.get("pinned")), labelled=bool(data.get("labelled")),
            kind=data.get("kind") or "",
        )


class GotoForm(forms.Form):
    """Where the timeline's "Go to" box leads: a version's number ("308", "v308"), or a moment (a date,
    or a date and time, in UTC unless it names its offset) whose version is the one written last by then."""

    at = forms.CharField(max_length=100, label="Go to")

    def clean_at(self) -> tuple[int | None, datetime | None, str]:
        """(number, None, "v308") or (None, moment, what was asked for, in words)."""
        raw = self.cleaned_data["at"].strip()
        digits = raw.removeprefix("v").removeprefix("V")
        if digits.isascii() and digits.isdigit():
            return int(digits), None, f"v{int(digits)}"
        try:
            # A day alone means the end of it: the state the session had that day, at its last.
            moment = parse_moment(raw, end_of_day=True)
        except forms.ValidationError:
            raise forms.ValidationError(f"Not a version or a moment: use a number (v308) or {WHEN_HELP}.") from None
        if parse_date(raw) is not None:
            return None, moment, f"the end of {raw} (UTC)"
        return None, moment, raw if parse_datetime(raw).tzinfo else f"{raw} (UTC)"  # type: ignore[union-attr]


class DataFixForm(forms.Form):
    state = forms.CharField(strip=False, error_messages={"required": "Give the state as a JSON object."})
    reason = _text(REASON_MAX)
    expected_version = forms.IntegerField(required=False, min_value=0)
    # The checksum of the state whose diff the page showed: only that state is recorded.
    previewed = forms.CharField(required=False, max_length=64)
