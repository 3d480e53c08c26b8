"""The user admin in the hands of staff who are not superusers: no way to another project's data."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.urls import reverse
from django.utils import timezone

from sessions_app.models import Role
from sessions_app.services import membership_set
from tests.factories import make_project, make_user

User = get_user_model()
NEW_PASSWORD = "correct-horse-battery-42"


@pytest.fixture
def editor(db):
    """Staff, not a superuser, with the user permissions (and the project models'), admin of acme,
    operator of initech."""
    user = make_user("erika", staff=True)
    user.user_permissions.set(Permission.objects.filter(
        content_type__app_label="sessions_app") | Permission.objects.filter(codename__endswith="_user"))
    make_project("acme", owner=user, role=Role.ADMIN)
    make_project("initech", owner=user, role=Role.OPERATOR)
    return user


@pytest.fixture
def acme(editor):
    return editor.memberships.get(project__slug="acme").project


@pytest.fixture
def initech(editor):
    return editor.memberships.get(project__slug="initech").project


@pytest.fixture
def plain(acme):
    """A member of acme only: the editor administers every project it reaches."""
    user = make_user("paul")
    membership_set(project=acme, user=user, role=Role.OPERATOR)
    return user


@pytest.fixture
def out_of_reach(acme, initech):
    """Accounts that reach more than the editor administers."""
    root = User.objects.create_superuser("root", password="pw-for-tests-1")
    colleague = make_user("stan", staff=True)  # staff, even of acme only
    membership_set(project=acme, user=colleague, role=Role.VIEWER)
    initech_member = make_user("ines")  # also of initech, where the editor is only an operator
    membership_set(project=acme, user=initech_member, role=Role.VIEWER)
    membership_set(project=initech, user=initech_member, role=Role.VIEWER)
    globex_member = make_user("gus")
    membership_set(project=make_project("globex"), user=globex_member, role=Role.ADMIN)
    return [root, colleague, initech_member, globex_member]


def change_form(user, **fields) -> dict:
    joined = timezone.localtime(user.date_joined)
    return {"username": user.username, "date_joined_0": joined.strftime("%Y-%m-%d"),
            "date_joined_1": joined.strftime("%H:%M:%S"), "is_active": "on", **fields}


def privileges_posted() -> dict:
    group, _ = Group.objects.get_or_create(name="ops")
    group.permissions.set(Permission.objects.all())
    return {"is_superuser": "on", "is_staff": "on", "groups": [group.pk],
            "user_permissions": list(Permission.objects.values_list("pk", flat=True))}


def password_form() -> dict:
    return {"usable_password": "true", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD}


def test_staff_cannot_grant_privileges_to_itself_or_to_an_account_it_edits(client, editor, plain):
    client.force_login(editor)
    granted = editor.user_permissions.count()
    # Its own account is staff, so out of its reach: the privileges it posts change nothing.
    client.post(reverse("admin:auth_user_change", args=[editor.pk]), change_form(editor, **privileges_posted()))
    editor.refresh_from_db()
    assert not editor.is_superuser and editor.groups.count() == 0 and editor.user_permissions.count() == granted

    # A plain member of its project is still edited, its privileges shown but not editable...
    url = reverse("admin:auth_user_change", args=[plain.pk])
    page = client.get(url).content.decode()
    assert 'name="first_name"' in page
    for field in ("is_superuser", "is_staff", "groups", "user_permissions"):
        assert f'name="{field}"' not in page
    response = client.post(url, change_form(plain, first_name="Paul", **privileges_posted()))
    assert response.status_code == 302
    plain.refresh_from_db()
    assert plain.first_name == "Paul"  # ...and what is posted for them is ignored
    assert not plain.is_superuser and not plain.is_staff
    assert plain.groups.count() == 0 and plain.user_permissions.count() == 0
    # It can be deactivated (its password is a superuser's to set: the editor did not create it).
    assert client.post(url, {k: v for k, v in change_form(plain).items() if k != "is_active"}).status_code == 302
    plain.refresh_from_db()
    assert not plain.is_active

    # A new account is a plain one, whatever is posted.
    add = reverse("admin:auth_user_add")
    response = client.post(add, {"username": "newbie", "usable_password": "true", "password1": NEW_PASSWORD,
                                 "password2": NEW_PASSWORD, **privileges_posted()})
    assert response.status_code == 302
    newbie = User.objects.get(username="newbie")
    assert not newbie.is_superuser and not newbie.is_staff and newbie.user_permissions.count() == 0


def test_staff_cannot_see_change_reset_or_delete_an_account_that_reaches_beyond_its_projects(
    client, editor, plain, out_of_reach
):
    client.force_login(editor)
    changelist = reverse("admin:auth_user_changelist")
    listed = client.get(changelist).content.decode()
    assert f'href="{reverse("admin:auth_user_change", args=[plain.pk])}"' in listed
    for user in out_of_reach:
        change = reverse("admin:auth_user_change", args=[user.pk])
        assert f'href="{change}"' not in listed, user.username
        assert client.get(change).status_code == 302  # "doesn't exist", as Django says of a missing one
        response = client.post(change, change_form(user, email="erika@example.com", is_superuser="on"))
        assert response.status_code == 302 and response.url == reverse("admin:index")
        password = reverse("admin:auth_user_password_change", args=[user.pk])
        assert client.get(password).status_code == 404
        assert client.post(password, password_form()).status_code == 404
        delete = reverse("admin:auth_user_delete", args=[user.pk])
        assert client.get(delete).status_code == 302
        client.post(delete, {"post": "yes"})
        user.refresh_from_db()  # still there, unchanged
        assert user.email == "" and user.is_active and not user.check_password(NEW_PASSWORD), user.username
        assert user.is_superuser == (user.username == "root")

    # A bulk delete of them all deletes only the account within reach.
    selected = [plain.pk, *(user.pk for user in out_of_reach)]
    client.post(changelist, {"action": "delete_selected", "_selected_action": selected, "post": "yes"})
    assert not User.objects.filter(pk=plain.pk).exists()
    assert User.objects.filter(pk__in=selected).count() == len(out_of_reach)

    # A superuser still manages every account.
    root, colleague, initech_member, globex_member = out_of_reach
    client.force_login(root)
    listed = client.get(changelist).content.decode()
    assert all(f'href="{reverse("admin:auth_user_change", args=[user.pk])}"' in listed for user in out_of_reach)
    url = reverse("admin:auth_user_change", args=[colleague.pk])
    assert client.post(url, change_form(colleague, is_staff="on", is_superuser="on")).status_code == 302
    colleague.refresh_from_db()
    assert colleague.is_superuser
    password = reverse("admin:auth_user_password_change", args=[globex_member.pk])
    assert client.post(password, password_form()).status_code == 302
    globex_member.refresh_from_db()
    assert globex_member.check_password(NEW_PASSWORD)
    response = client.post(reverse("admin:auth_user_delete", args=[initech_member.pk]), {"post": "yes"})
    assert response.status_code == 302 and not User.objects.filter(pk=initech_member.pk).exists()


def test_staff_set_the_password_only_of_an_account_they_created(client, editor, acme):
    """A project admin could take any account of no project into its project, set its password and sign in
    as it: every project that took it in later was then theirs to read. Only its creator, or a superuser."""
    newcomer = make_user("nora")  # made by a superuser for another project, not added to it yet
    client.force_login(editor)
    change = reverse("admin:auth_user_change", args=[newcomer.pk])
    assert f'href="{change}"' in client.get(reverse("admin:auth_user_changelist")).content.decode()
    password = reverse("admin:auth_user_password_change", args=[newcomer.pk])
    for response in (client.get(password), client.post(password, password_form())):
        assert response.status_code == 302 and response.url == change
    # Taken into the editor's project first (as the Memberships page lets any admin do): still refused.
    add_member = reverse("admin:sessions_app_membership_add")
    assert client.post(add_member, {"project": acme.pk, "user": "nora", "role": Role.VIEWER}).status_code == 302
    for response in (client.get(password), client.post(password, password_form())):
        assert response.status_code == 302 and response.url == change
    newcomer.refresh_from_db()
    assert not newcomer.check_password(NEW_PASSWORD)
    assert "Only a superuser, or whoever created nora here, sets its password" in client.get(change).content.decode()

    # An account the editor created here: its password is theirs to set again (a forgotten one).
    response = client.post(reverse("admin:auth_user_add"), {"username": "newbie", "usable_password": "true",
                                                             "password1": "pw-first-1", "password2": "pw-first-1"})
    assert response.status_code == 302
    newbie = User.objects.get(username="newbie")
    assert client.post(reverse("admin:auth_user_password_change", args=[newbie.pk]), password_form()).status_code == 302
    newbie.refresh_from_db()
    assert newbie.check_password(NEW_PASSWORD)

    root = User.objects.create_superuser("root", password="pw-for-tests-1")
    client.force_login(root)
    assert client.post(password, password_form()).status_code == 302
    newcomer.refresh_from_db()
    assert newcomer.check_password(NEW_PASSWORD)


def test_groups_are_managed_by_superusers_only(client, editor):
    """A group grants permissions service-wide: staff given the group permissions could add any
    permission to a group they belong to."""
    editor.user_permissions.add(*Permission.objects.filter(codename__endswith="_group"))
    group = Group.objects.create(name="operators")
    editor.groups.add(group)
    client.force_login(editor)
    assert "auth/group" not in client.get(reverse("admin:index")).content.decode()
    users = client.get(reverse("admin:auth_user_changelist")).content.decode()
    assert "operators" not in users and "By groups" not in users and "By active" in users  # (the list's filters)
    assert client.get(reverse("admin:auth_group_changelist")).status_code == 403
    everything = list(Permission.objects.values_list("pk", flat=True))
    response = client.post(reverse("admin:auth_group_change", args=[group.pk]), {"name": "operators", "permissions": everything})
    assert response.status_code == 403 and not group.permissions.exists()
    assert client.post(reverse("admin:auth_group_add"), {"name": "mine", "permissions": everything}).status_code == 403
    assert not Group.objects.filter(name="mine").exists()

    root = User.objects.create_superuser("root", password="pw-for-tests-1")
    client.force_login(root)
    response = client.post(reverse("admin:auth_group_change", args=[group.pk]), {"name": "operators", "permissions": everything[:2]})
    assert response.status_code == 302 and group.permissions.count() == 2
