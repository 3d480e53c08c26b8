"""A project always keeps an admin who can sign in: the member services refuse (LastAdmin, nothing
stored) whatever would leave it none, whoever calls them (the admin, a command, a script)."""

from __future__ import annotations

import threading
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from sessions_app.errors import LastAdmin
from sessions_app.models import AuditEvent, Membership, Role
from sessions_app.services import (
    membership_remove,
    membership_set,
    memberships_remove,
    user_delete,
    users_delete,
)
from tests.factories import make_project, make_user
from tests.locks import someone_waits_on_a_lock

User = get_user_model()


@pytest.fixture
def acme(db):
    return make_project("acme")


@pytest.fixture
def alice(acme):
    user = make_user("alice")
    membership_set(project=acme, user=user, role=Role.ADMIN)
    return user


def test_the_last_admin_is_neither_demoted_removed_nor_deleted_and_nothing_is_stored(acme, alice):
    bob = make_user("bob")
    membership_set(project=acme, user=bob, role=Role.OPERATOR)
    audited = AuditEvent.objects.count()
    mine = Membership.objects.get(project=acme, user=alice)

    with pytest.raises(LastAdmin, match="Making alice a viewer instead of an admin would leave the project acme "
                                        "with no admin who can sign in"):
        membership_set(project=acme, user=alice, role=Role.VIEWER)
    with pytest.raises(LastAdmin, match="Removing alice would leave the project acme"):
        membership_remove(membership=mine)
    with pytest.raises(LastAdmin, match="Deleting the account alice would leave the project acme"):
        user_delete(user=alice)
    assert Membership.objects.get(pk=mine.pk).role == Role.ADMIN and User.objects.filter(pk=alice.pk).exists()
    assert AuditEvent.objects.count() == audited

    # Others come and go as before; promoted, bob lets alice go.
    membership_set(project=acme, user=bob, role=Role.VIEWER)
    membership_set(project=acme, user=bob, role=Role.ADMIN)
    membership_set(project=acme, user=alice, role=Role.VIEWER)
    user_delete(user=alice)
    assert list(Membership.objects.filter(project=acme).values_list("user__username", "role")) == [("bob", "admin")]
    assert AuditEvent.objects.filter(action="membership.remove", details__user="alice").exists()


def test_a_member_another_admin_removed_or_changed_meanwhile_is_recorded_as_it_was_once(acme, alice):
    """Two admins remove bob from pages opened before either acted: the audit log said he was removed
    twice, and with the role the page had read, not the one he had."""
    bob, carol = make_user("bob"), make_user("carol")
    membership_set(project=acme, user=bob, role=Role.OPERATOR)
    membership_set(project=acme, user=carol, role=Role.VIEWER)
    read_by_first, read_by_second = (list(Membership.objects.filter(user__in=[bob, carol]).order_by("user__username"))
                                     for _ in range(2))
    membership_set(project=acme, user=carol, role=Role.OPERATOR)  # changed after both pages were read
    memberships_remove(memberships=read_by_first)
    memberships_remove(memberships=read_by_second)
    removals = list(AuditEvent.objects.filter(action="membership.remove").values_list("details__user", "details__role"))
    assert sorted(removals) == [("bob", "operator"), ("carol", "operator")]
    assert list(Membership.objects.filter(project=acme).values_list("user__username", flat=True)) == ["alice"]


def test_an_admin_whose_account_is_deactivated_does_not_count(acme, alice):
    dormant = make_user("dora")
    membership_set(project=acme, user=dormant, role=Role.ADMIN)
    dormant.is_active = False
    dormant.save()
    with pytest.raises(LastAdmin, match="Making alice an operator instead of an admin would leave"):
        membership_set(project=acme, user=alice, role=Role.OPERATOR)
    assert Membership.objects.get(user=alice).role == Role.ADMIN
    membership_remove(membership=Membership.objects.get(user=dormant))  # alice stays
    assert list(Membership.objects.values_list("user__username", "role")) == [("alice", "admin")]


def test_a_selection_that_removes_every_admin_is_refused_whole(acme, alice):
    """Each removal alone would leave the other admin; together they leave none: all or nothing."""
    bob, other = make_user("bob"), make_project("globex")
    membership_set(project=acme, user=bob, role=Role.ADMIN)
    membership_set(project=other, user=bob, role=Role.ADMIN)
    with pytest.raises(LastAdmin, match="Removing these members would leave the project acme "):
        memberships_remove(memberships=list(Membership.objects.filter(project=acme)))
    with pytest.raises(LastAdmin, match="Deleting these accounts would leave the projects acme, globex "
                                        "with no admin who can sign in, and nobody could manage their members"):
        users_delete(users=[alice, bob])
    assert Membership.objects.count() == 3 and User.objects.count() == 2
    assert not AuditEvent.objects.filter(action="membership.remove").exists()


def test_the_create_project_command_refuses_to_demote_the_last_admin(acme, alice):
    with pytest.raises(CommandError, match="would leave the project acme with no admin"):
        call_command("create_project", "acme", "--viewer", "alice", stdout=StringIO())
    assert Membership.objects.get(user=alice).role == Role.ADMIN


@pytest.mark.django_db(transaction=True)
def test_two_admins_removing_each_other_at_once_leave_the_project_one():
    """Each removal saw the other admin still there and both went through: the project was left with
    none. A change of members waits for any other in the same project, then counts again."""
    project = make_project("acme")
    alice, bob = make_user("alice"), make_user("bob")
    membership_set(project=project, user=alice, role=Role.ADMIN)
    membership_set(project=project, user=bob, role=Role.ADMIN)
    outcome: list[object] = []

    def remove_bob() -> None:
        try:
            membership_remove(membership=Membership.objects.get(user=bob))
            outcome.append("removed")
        except LastAdmin as exc:
            outcome.append(exc)
        finally:
            connection.close()

    racer = threading.Thread(target=remove_bob)
    with transaction.atomic():
        membership_remove(membership=Membership.objects.get(user=alice))
        racer.start()
        assert someone_waits_on_a_lock(racer), "the second removal did not wait for the first"
    racer.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], LastAdmin)
    assert list(Membership.objects.values_list("user__username", "role")) == [("bob", "admin")]
