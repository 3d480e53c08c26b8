"""Template tags of the dashboard."""

from __future__ import annotations

from datetime import datetime

from django import template
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

register = template.Library()


@register.simple_tag
def ago(moment: datetime | None) -> SafeString | str:
    """How long ago, to the second under a minute ("12 s ago"): whether an engine wrote a moment ago
    or a minute ago is what an operator reads it for, and timesince says "0 minutes" to both. While
    the page stays open, static/js/app.js moves it on (`data-ago`)."""
    if moment is None:
        return ""
    seconds = max(int((timezone.now() - moment).total_seconds()), 0)  # (a moment a little ahead: now)
    text = f"{seconds} s ago" if seconds < 60 else f"{timesince(moment)} ago"
    stamp = moment.isoformat()
    # data-ago: the age in seconds by the server's clock (app.js counts on from it, whatever the
    # browser's clock says).
    return format_html('<time datetime="{}" title="{}" data-ago="{}">{}</time>', stamp, stamp, seconds, text)


TRACEBACK = "Traceback (most recent call last):"


@register.filter
def error_gist(error: str | None) -> str:
    """What an error says, for a place with room for a line: a Python traceback's exception (its last
    lines, after the frames), not its opening. Cut to fit, the list, the session's header and the
    timeline showed "Traceback (most recent call last): File "agent.py", line 42, in run resul…"
    for every failed session alike; the whole text stays in the title and on the version's page.
    Any other error is returned as it is."""
    text = (error or "").strip()
    if not text.startswith(TRACEBACK):
        return text
    lines = text.splitlines()
    # The exception starts at the first unindented line after the last frame ("  File …" and the
    # indented source and ^^^ lines under it); a chained traceback's last exception is the last one.
    start = 1
    for number, line in enumerate(lines):
        if line.startswith("  File "):
            start = number + 1
    while start < len(lines) and (lines[start].startswith(" ") or not lines[start].strip()):
        start += 1
    return "\n".join(lines[start:]).strip() or text


@register.filter
def size_change(delta: int | None) -> str:
    """A change of size in bytes as the page's other sizes read: "+1.2 KB", or a minus sign (U+2212, as
    the change counts have) and "139.9 KB", where "-143220 B" stood beside "152.9 KB"."""
    if not delta:
        return ""
    sign = "+" if delta > 0 else "\u2212"
    return f"{sign}{filesizeformat(abs(delta))}"
