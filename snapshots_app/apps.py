from django.apps import AppConfig


class SnapshotsAppConfig(AppConfig):
    name = "snapshots_app"
    verbose_name = "Versions and state store"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from snapshots_app import signals  # noqa: F401 - connects the receivers
