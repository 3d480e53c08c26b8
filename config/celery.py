"""The Celery app. Workers: `celery -A config worker`; schedule: `celery -A config beat`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from config.startup import settings_or_exit

settings_or_exit()

app = Celery("session_rewind")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
