"""Audit what Django itself deletes: a user account deleted (in the admin's Users, or by a script)
takes its project memberships with it, which removes access and so belongs in the audit log."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models.signals import pre_delete
from django.dispatch import receiver

from sessions_app.models import Membership
from sessions_app.services import membership_removal_audit


@receiver(pre_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="sessions_audit_user_delete")
def _audit_memberships_of_deleted_user(sender: type, instance: Any, **kwargs: Any) -> None:
    for membership in Membership.objects.filter(user=instance).select_related("project", "user"):
        membership_removal_audit(
            membership=membership, reason="the user account was deleted (Django's admin history names who deleted it)"
        )
