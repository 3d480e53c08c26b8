"""Logging filters for LOGGING (config/settings.py)."""

from __future__ import annotations

import logging


class RefusalsWithoutTraceback(logging.Filter):
    """django.request logs each 4xx a view raised (PermissionDenied, Http404) with that exception: ~35
    lines of traceback for a viewer's refused click, which reads as a crash to whoever searches the log
    for "Traceback". The warning's one line says what was refused and where; 5xx keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        status = getattr(record, "status_code", None)
        if record.exc_info and isinstance(status, int) and 400 <= status < 500:
            record.exc_info = None
            record.exc_text = None
        return True


class BeatSendsWithoutTraceback(logging.Filter):
    """celery.beat logs each scheduled send the broker refused ("Message Error: Couldn't apply
    scheduled task requeue-stale-jobs: <the error>") with its call stack and ~100 lines of chained
    traceback: every minute while Redis is down, burying the line that says what is wrong. That line
    stays; beat sends again on its next tick, and recovers by itself once Redis is back."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Message Error: %s") and isinstance(record.args, tuple) and record.args:
            record.msg, record.args = "Message Error: %s", record.args[:1]  # (the second is the stack)
            record.exc_info = None
            record.exc_text = None
        return True
