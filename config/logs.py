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
