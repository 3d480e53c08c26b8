"""Template filters of the dashboard."""

from __future__ import annotations

from datetime import datetime

from django import template
from django.utils import timezone
from django.utils.timesince import timesince

register = template.Library()


@register.filter
def ago(moment: datetime | None) -> str:
    """How long ago, to the second under a minute ("12 s ago"): whether an engine wrote a moment ago
    or a minute ago is what an operator reads it for, and timesince says "0 minutes" to both."""
    if moment is None:
        return ""
    seconds = int((timezone.now() - moment).total_seconds())
    if seconds < 60:
        return f"{max(seconds, 0)} s ago"
    return f"{timesince(moment)} ago"
