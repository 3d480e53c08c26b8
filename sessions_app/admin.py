"""Admin for data fixes (staff only; Django's per-model permissions apply). Writes go through the
services, history rows (sessions, audit events) are read-only, and nothing is deleted in place.

Superusers (who run the service) reach every project. Other staff reach only the projects they are
members of, and change things there only as their role allows (see admin_projects)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

import orjson
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.models import ADDITION, LogEntry
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import quote, unquote
from django.contrib.admin.views.main import PAGE_VAR
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db import DataError, router, transaction
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.html import format_html

from sessions_app.errors import InvalidState, NotFound, StateStoreError, first_line
from sessions_app.models import (
    ApiKey,
    AuditEvent,
    Membership,
    Project,
    Role,
    SessionStatus,
    WorkflowSession,
)
from sessions_app.selectors import (
    API_KEY_STATUS_CHOICES,
    API_KEY_STATUSES,
    CreatorStatus,
    api_key_status_q,
    api_keys_listed,
    api_keys_working_made_by,
    audit_change,
    role_allows,
    users_reaching_only,
)
from sessions_app.services import (
    REASON_MAX,
    api_key_clean_expiry,
    api_key_create,
    api_key_default_expiry,
    api_key_revoke,
    api_key_set_expiry,
    clean_metadata,
    clean_tags,
    ensure_writable,
    membership_demotion_refused,
    membership_remove,
    membership_set,
    memberships_removal_refused,
    memberships_remove,
    project_create,
    session_archive,
    session_unarchive,
    session_update,
    user_active_changed,
    user_delete,
    users_delete,
    users_deletion_refused,
)
from sessions_app.strict_json import decode_error_words, refuse_duplicate_keys, refuse_huge_integers, same_json


def admin_projects(request: HttpRequest, role: str = Role.VIEWER) -> QuerySet[Project]:
    """The projects a staff user reaches in the admin with at least `role`: every project for a
    superuser, else those they are a member of in such a role (nobody reads another project's data;
    viewers read, operators also fix data and pin, admins also manage keys, members and jobs)."""
    if request.user.is_superuser:
        return Project.objects.all()
    if request.user.pk is None:
        return Project.objects.none()
    roles = [name for name in Role.values if role_allows(name, role)]
    return Project.objects.filter(memberships__user_id=request.user.pk, memberships__role__in=roles)


def may_change(request: HttpRequest, project_id: int, role: str) -> bool:
    # Remembered for the request: the admin asks has_*_permission 6-7 times while drawing one page.
    known: dict[tuple[int, str], bool] = request.__dict__.setdefault("_may_change", {})
    if (project_id, role) not in known:
        known[project_id, role] = admin_projects(request, role).filter(pk=project_id).exists()
    return known[project_id, role]


def require_role(request: HttpRequest, project_ids: Iterable[int], role: str) -> None:
    """PermissionDenied unless the user has `role` in every one of these projects (one query)."""
    wanted = set(project_ids)
    if len(wanted) != admin_projects(request, role).filter(pk__in=wanted).count():
        # Named (those the user can see at all): with several selected, "the project" left them guessing.
        lacking = admin_projects(request).filter(pk__in=wanted).exclude(pk__in=admin_projects(request, role))
        names = ", ".join(sorted(project.slug for project in lacking)) or "the project"
        raise PermissionDenied(f"this needs the {role} role in {names}")


def pasted_uuid(search_term: str) -> uuid.UUID | None:
    """The id an operator pasted into a search box (a session's, from its page's address or the API), if it is one."""
    try:
        return uuid.UUID(search_term.strip())
    except ValueError:
        return None


def warn_of_keys_left_working(request: HttpRequest, user: Any, *, project_ids: Any, standing: str) -> None:
    """After `user` stopped being an admin (or active), say which keys they made still work: they are
    kept (an engine may depend on one), so an admin decides. Only keys of projects the request's
    user administers are named."""
    warn_of_keys(request, user, keys_left_working(request, user, project_ids=project_ids), standing=standing)


def keys_left_working(request: HttpRequest, user: Any, *, project_ids: Any) -> list[ApiKey]:
    """The first few working keys `user` made in these projects, of those the request's user administers."""
    visible = admin_projects(request, Role.ADMIN).filter(pk__in=project_ids).values("pk")
    return list(api_keys_working_made_by(user=user, project_ids=visible).select_related("project").order_by("pk")[:6])


def warn_of_keys(request: HttpRequest, user: Any, keys: list[ApiKey], *, standing: str) -> None:
    if not keys:
        return
    names = ", ".join(f"{key.project.slug}: {key.name}" for key in keys[:5]) + (", ..." if len(keys) > 5 else "")
    # Narrowed to their keys by the name kept on each key (after a deletion, "no account" alone
    # would also list the keys commands made).
    query = urlencode({"status": "active", "creator": standing, "q": user.get_username()})
    url = reverse("admin:sessions_app_apikey_changelist") + f"?{query}"
    messages.warning(request, format_html(
        '{} made API keys that still work ({}). They were not revoked, since an engine may depend on them: '
        '<a href="{}">review them</a> and revoke those nobody answers for.', user.get_username(), names, url,
    ))


class ProjectListFilter(admin.RelatedFieldListFilter):
    """The "By project" filter, offering only the projects the user reaches (not every project's name)."""

    def field_choices(  # type: ignore[override]  # (the stubs want a list of lazy strings)
        self, field: Any, request: HttpRequest, model_admin: Any
    ) -> list[tuple[str, str]]:
        return [(str(project.pk), str(project)) for project in admin_projects(request).order_by("name")]

    def has_output(self) -> bool:
        # Django hides a filter of one choice, and then drops its parameter too: for staff in one project,
        # an address naming another project listed every row of theirs under it.
        return True


class ServiceRefusalsAdmin(admin.ModelAdmin):
    """A save or deletion the services refuse after the page's own checks passed is a message, not a
    500. Django's transaction around the change is rolled back whole (its history entry with it), then:
    a row deleted meanwhile (by another admin, a script, the API) gets the admin's own "doesn't exist.
    Perhaps it was deleted?", anything else (a session archived meanwhile, ...) its message, on the
    page it was posted from (a deletion: the row's page)."""

    def changeform_view(self, request: HttpRequest, object_id: str | None = None, form_url: str = "",
                        extra_context: dict[str, Any] | None = None) -> HttpResponse:
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except StateStoreError as exc:
            return self.refused(request, exc, object_id, back=request.get_full_path())

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
                    ) -> HttpResponse:
        change = f"admin:{self.opts.app_label}_{self.opts.model_name}_change"
        back = reverse(change, args=[quote(object_id)], current_app=self.admin_site.name)
        obj = self.get_object(request, unquote(object_id))
        # Refused before the confirmation page is shown, not after it was confirmed.
        refusal = None if obj is None else self.deletion_refused(request, self.model._default_manager.filter(pk=obj.pk))
        if refusal is not None:
            return self.refused(request, refusal, object_id, back=back)
        try:
            return super().delete_view(request, object_id, extra_context)
        except StateStoreError as exc:
            return self.refused(request, exc, object_id, back=back)

    def deletion_refused(self, request: HttpRequest, rows: QuerySet) -> StateStoreError | None:
        """Why the services would refuse to delete these rows (asked before Django's confirmation page), or None."""
        return None

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        """A list address whose filters cannot be applied (`?head_number__gt=abc`, a NUL, a broken
        regex: the admin takes any lookup on a model's own fields) is a 400 saying which, with a link
        to the whole list. Django answered the first with a redirect to "Something's wrong with your
        database installation", and the others with a 500."""
        try:
            response = super().changelist_view(request, extra_context)
            if isinstance(response, TemplateResponse):
                response.render()  # (the page's rows are read here)
            return response
        except PastTheEnd:
            messages.info(request, f"That page is past the end of this list (a list of history stops counting at "
                                   f"{CappedCountPaginator.cap:,} rows: filter it, or search, to reach older ones). "
                                   "This is its first page.")
            query = request.GET.copy()
            query.pop(PAGE_VAR)
            return HttpResponseRedirect(f"{request.path}?{query.urlencode()}")
        except UnreadableListAddress as exc:
            problem = str(exc).rstrip(".")
        except DataError as exc:
            problem = first_line(exc).rstrip(".")
        return TemplateResponse(request, "admin/list_address_problem.html", {
            **self.admin_site.each_context(request), "opts": self.opts, "problem": problem,
            "title": f"This list of {self.opts.verbose_name_plural} cannot be shown",
        }, status=400)

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        try:
            return super().get_changelist_instance(request)
        except IncorrectLookupParameters as exc:
            if not exc.args:
                # Django's word for a page past the list's end (after an action emptied the last page, or
                # past the rows a history list counts), and for an `__isempty` value other than 0 or 1.
                if PAGE_VAR in request.GET:
                    raise PastTheEnd() from None
                raise UnreadableListAddress("a filter's value is not one this list takes") from None
            cause = exc.args[0]  # (Django wraps what the filter raised)
            words = "; ".join(cause.messages) if isinstance(cause, ValidationError) else first_line(cause)
            raise UnreadableListAddress(words) from None

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions: dict[str, Any] = super().get_actions(request)
        deleting = actions.get("delete_selected")
        if deleting is not None:
            actions["delete_selected"] = (delete_selected_unless_refused, *deleting[1:])
        return actions

    def refused(self, request: HttpRequest, exc: StateStoreError, object_id: str | None, *, back: str) -> HttpResponse:
        if isinstance(exc, NotFound) and object_id is not None:
            # Django's own message and redirect for a missing row (not in the type stubs).
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)  # type: ignore[attr-defined,no-any-return]
        messages.error(request, exc.message)
        return HttpResponseRedirect(back)


class UnreadableListAddress(Exception):
    pass


class PastTheEnd(Exception):
    pass


def delete_selected_unless_refused(
    modeladmin: ServiceRefusalsAdmin, request: HttpRequest, queryset: QuerySet
) -> HttpResponse | None:
    """Django's "Delete selected" action, but a deletion the services refuse (deletion_refused) is
    refused with their message before its confirmation page, and one they refuse after it (something
    changed meanwhile) deletes nothing: Django's history entries, written before the rows are deleted,
    are rolled back with the rest."""
    refusal = modeladmin.deletion_refused(request, queryset)
    if refusal is None:
        try:
            with transaction.atomic(using=router.db_for_write(modeladmin.model)):
                return delete_selected(modeladmin, request, queryset)  # type: ignore[no-any-return]
        except StateStoreError as exc:
            refusal = exc
    messages.error(request, refusal.message)
    return None


class ProjectScopedAdmin(ServiceRefusalsAdmin):
    """Rows of the projects the staff user reaches (admin_projects); `project_lookup` leads to them."""

    project_lookup = "project"
    view_role: str = Role.VIEWER  # the role in a project that shows its rows here

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        return queryset.filter(**{f"{self.project_lookup}__in": admin_projects(request, self.view_role)})

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "project":  # what is added (a key, a member) goes where the user is an admin
            kwargs["queryset"] = admin_projects(request, Role.ADMIN)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


class CappedCountPaginator(Paginator):
    """Counts at most `cap` + 1 rows (`capped` when it stopped there; templates/admin/pagination.html
    and search_form.html then say "more than"): a count(*) of a table of millions on every page
    view and filter click costs seconds. Pages past the cap are reached by filtering."""

    cap = 10_000

    @cached_property
    def count(self) -> int:
        return self.object_list[: self.cap + 1].count()  # type: ignore[attr-defined,no-any-return,index]

    @property
    def capped(self) -> bool:
        return self.count > self.cap

    @property
    def cap_display(self) -> str:
        return f"{self.cap:,}"


class ReadOnlyAdmin(ProjectScopedAdmin):
    """Rows that are history: visible to staff with the view permission, never edited in place.
    History only grows, so its lists never count a whole table."""

    paginator = CappedCountPaginator
    show_full_result_count = False
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Project)
class ProjectAdmin(ProjectScopedAdmin):
    project_lookup = "pk"
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    fields = ["name", "slug"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return ["name", "slug", "created_at"] if obj is not None else []

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False if obj is not None else super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        if request.resolver_match is not None and request.resolver_match.url_name == "autocomplete":
            # The project pickers (of a new key, a new member) offer only where the form accepts one.
            queryset = queryset.filter(pk__in=admin_projects(request, Role.ADMIN))
        return super().get_search_results(request, queryset, search_term)

    def save_model(self, request: HttpRequest, obj: Project, form: Any, change: bool) -> None:
        created = project_create(name=obj.name, slug=obj.slug, owner=request.user)
        obj.pk, obj.created_at = created.pk, created.created_at


class MembershipForm(forms.ModelForm):
    """A new member is named by username. A raw user id needed the user list's popup, which only
    superusers reach (it lists every user of every project), so project admins typed ids blind."""

    user = forms.ModelChoiceField(
        queryset=get_user_model().objects.filter(is_active=True), to_field_name="username", widget=forms.TextInput,
        help_text="The username of an active account (exactly as it signs in).",
        error_messages={"invalid_choice": "No active user has that username."},
    )

    class Meta:
        model = Membership
        fields = ["project", "user", "role"]

    def clean(self) -> dict[str, Any]:
        super().clean()
        role = self.cleaned_data.get("role")
        if self.instance.pk is not None and role:
            # Said on the form (membership_set refuses it too, under the project's lock).
            refusal = membership_demotion_refused(membership=self.instance, role=role)
            if refusal is not None:
                raise forms.ValidationError(refusal.message)
        return self.cleaned_data


@admin.register(Membership)
class MembershipAdmin(ProjectScopedAdmin):
    list_display = ["user", "project", "role", "created_at"]
    list_filter = ["role", ("project", ProjectListFilter)]
    search_fields = ["user__username", "user__email", "project__slug", "project__name"]
    list_select_related = ["user", "project"]
    autocomplete_fields = ["project"]
    form = MembershipForm
    fields = ["project", "user", "role"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return ["project", "user"] if obj is not None else []

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_change_permission(request, obj)
        return allowed and (obj is None or may_change(request, obj.project_id, Role.ADMIN))

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_delete_permission(request, obj)
        return allowed and (obj is None or may_change(request, obj.project_id, Role.ADMIN))

    def save_model(self, request: HttpRequest, obj: Membership, form: Any, change: bool) -> None:
        require_role(request, [obj.project_id], Role.ADMIN)
        saved = membership_set(project=obj.project, user=obj.user, role=obj.role, actor=request.user)
        obj.pk, obj.created_at = saved.pk, saved.created_at
        if obj.role != Role.ADMIN:
            warn_of_keys_left_working(request, obj.user, project_ids=[obj.project_id], standing=CreatorStatus.NOT_ADMIN)

    def deletion_refused(self, request: HttpRequest, rows: QuerySet[Membership]) -> StateStoreError | None:
        return memberships_removal_refused(memberships=rows)

    def delete_model(self, request: HttpRequest, obj: Membership) -> None:
        require_role(request, [obj.project_id], Role.ADMIN)
        membership_remove(membership=obj, actor=request.user)
        warn_of_keys_left_working(request, obj.user, project_ids=[obj.project_id], standing=CreatorStatus.NOT_ADMIN)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        memberships = list(queryset.select_related("project", "user"))
        require_role(request, [membership.project_id for membership in memberships], Role.ADMIN)  # all or none
        memberships_remove(memberships=memberships, actor=request.user)  # all or none, too
        for membership in memberships:
            warn_of_keys_left_working(request, membership.user, project_ids=[membership.project_id],
                                      standing=CreatorStatus.NOT_ADMIN)


admin.site.unregister(get_user_model())
admin.site.unregister(Group)


@admin.register(Group)
class SuperuserGroupAdmin(GroupAdmin):
    """Groups grant Django permissions service-wide (the user admin, creating projects, ...): only
    superusers, who run the service, manage them. Staff given `auth.change_group` could otherwise add
    permissions to a group they belong to."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_add_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser


@admin.register(get_user_model())
class AuditedUserAdmin(ServiceRefusalsAdmin, UserAdmin):
    """Django's user admin, except that deleting, deactivating or reactivating an account records,
    in each project it is a member of, who did it, and that only superusers manage every account.

    Staff who are not superusers, given the user permissions, would otherwise reach every project:
    by ticking is_superuser on themselves (or granting themselves permissions or groups), or by
    setting the password of an account that reaches a project they do not and signing in as it.
    So for them the privilege fields (PRIVILEGE_FIELDS) are read-only, on a new account too, and the
    accounts they list, view, change, set the password of and delete (one or a selection) are only
    those that are neither superusers nor staff and are members only of projects where they are an
    admin, or of none (users_reaching_only). Any other account is, to them, one that does not
    exist: the change and delete pages say so, its password page is refused (404). Their own account is
    staff, so not among them: they change their own password on the admin's "Change password" page.

    They set the password only of an account they created here (its first one on the add page, a
    forgotten one later): one they took into their project and then set the password of was theirs to
    sign in as, and every project that took it in afterwards theirs to read (an account of no project
    was refused, until its taker added it first). Any other account's password a superuser sets."""

    PRIVILEGE_FIELDS = ["is_staff", "is_superuser", "groups", "user_permissions"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        return users_reaching_only(queryset, project_ids=admin_projects(request, Role.ADMIN).values("pk"))

    def user_change_password(self, request: HttpRequest, id: str, form_url: str = "") -> HttpResponse:
        user = self.get_object(request, unquote(id))
        if user is not None and not request.user.is_superuser and not self._created_by(user, request.user):
            messages.error(request, f"Only a superuser, or whoever created {user.username} here, sets its password: "
                                    "ask a superuser.")
            return HttpResponseRedirect(reverse("admin:auth_user_change", args=[quote(user.pk)]))
        return super().user_change_password(request, id, form_url)

    @staticmethod
    def _created_by(user: Any, creator: Any) -> bool:
        """Whether `creator` added `user` in this admin (its history records who did)."""
        return LogEntry.objects.filter(content_type=ContentType.objects.get_for_model(user), object_id=str(user.pk),
                                       action_flag=ADDITION, user=creator).exists()

    def get_list_filter(self, request: HttpRequest) -> Any:
        # The accounts they list are never staff nor superusers, and groups are the superusers' (their
        # names are not theirs to see): only "active" filters anything for them.
        return super().get_list_filter(request) if request.user.is_superuser else ["is_active"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        readonly = list(super().get_readonly_fields(request, obj))
        return readonly if request.user.is_superuser else [*readonly, *self.PRIVILEGE_FIELDS]

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        # In the admin's transaction (changeform_view): the change and its record commit together.
        super().save_model(request, obj, form, change)
        if change and "is_active" in form.changed_data:
            user_active_changed(user=obj, actor=request.user)
            if not obj.is_active:
                warn_of_keys_left_working(request, obj, project_ids=Project.objects.values("pk"),
                                          standing=CreatorStatus.DEACTIVATED)

    def deletion_refused(self, request: HttpRequest, rows: QuerySet[Any]) -> StateStoreError | None:
        return users_deletion_refused(users=rows)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        keys = keys_left_working(request, obj, project_ids=Project.objects.values("pk"))  # (theirs until deleted)
        user_delete(user=obj, actor=request.user)
        warn_of_keys(request, obj, keys, standing=CreatorStatus.NO_ACCOUNT)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        users = list(queryset)
        keys = [keys_left_working(request, user, project_ids=Project.objects.values("pk")) for user in users]
        users_delete(users=users, actor=request.user)  # all or none
        for user, theirs in zip(users, keys, strict=True):
            warn_of_keys(request, user, theirs, standing=CreatorStatus.NO_ACCOUNT)


# Rows acted on by one confirmed action (revoking keys, archiving sessions; each locked, changed and
# audited on its own). The confirm page sends back one field per row: past Django's
# DATA_UPLOAD_MAX_NUMBER_FIELDS (1,000) the confirmation was a bare "Bad Request" page.
CONFIRMED_IN_REQUEST = 500


def _expiry_checked(value: Any) -> Any:
    try:
        return api_key_clean_expiry(value)
    except InvalidState as exc:
        raise forms.ValidationError(exc.message) from None


class ApiKeyCreateForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(choices=ApiKey.Scope.choices, widget=forms.CheckboxSelectMultiple)

    class Meta:
        model = ApiKey
        fields = ["project", "name", "scopes", "expires_at"]
        help_texts = {"expires_at": "Empty: the key never expires."}

    def clean_expires_at(self) -> Any:
        return _expiry_checked(self.cleaned_data.get("expires_at"))


class ApiKeyExpiryForm(forms.ModelForm):
    """The one thing of a key that changes: its expiry (extend it; an expired key so extended works again)."""

    class Meta:
        model = ApiKey
        fields = ["expires_at"]
        help_texts = {"expires_at": "Extend it, set one, or empty it (never expires). Audited."}

    def clean_expires_at(self) -> Any:
        return _expiry_checked(self.cleaned_data.get("expires_at"))


class ApiKeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return API_KEY_STATUS_CHOICES

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
        value = self.value()
        return queryset.filter(api_key_status_q(value)) if value in API_KEY_STATUSES else queryset


class CreatorStatusFilter(admin.SimpleListFilter):
    title = "creator"
    parameter_name = "creator"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(CreatorStatus.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
        value = self.value()
        return queryset.filter(Q(creator_status=value)) if value in CreatorStatus.values else queryset


@admin.register(ApiKey)
class ApiKeyAdmin(ProjectScopedAdmin):
    """Create shows the secret once (only its hash is stored); keys are revoked, never edited, but for
    their expiry. Only a project's admins see its keys, as in the API."""

    view_role = Role.ADMIN

    list_display = ["name", "project", "prefix", "scope_list", "key_status", "made_by", "last_used_at", "expires_at",
                    "created_at"]
    list_filter = [("project", ProjectListFilter), ApiKeyStatusFilter, CreatorStatusFilter]
    search_fields = ["name", "prefix", "project__slug", "created_by_label"]
    list_select_related = ["project"]
    autocomplete_fields = ["project"]
    readonly_fields = ["project", "name", "prefix", "scope_list", "key_status", "created_by", "created_by_label",
                       "creator", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        return api_keys_listed(super().get_queryset(request))

    @admin.display(description="status")
    def key_status(self, obj: ApiKey) -> str:
        return ApiKey.Status(obj.status).label

    @admin.display(description="creator now", ordering="creator_status")
    def creator(self, obj: ApiKey) -> str:
        status = getattr(obj, "creator_status", None)
        return CreatorStatus(status).label if status else "-"

    @admin.display(description="scopes")
    def scope_list(self, obj: ApiKey) -> str:
        return ", ".join(obj.scopes)

    @admin.display(description="made by", ordering="creator_status")
    def made_by(self, obj: ApiKey) -> str:
        """Who made it, and whether they still answer for it (the list's filter has the long words)."""
        notes: dict[str, str] = {CreatorStatus.NOT_ADMIN: "no longer an admin", CreatorStatus.DEACTIVATED: "deactivated"}
        note = notes.get(getattr(obj, "creator_status", ""))
        label = obj.created_by_label or "-"
        return f"{label} ({note})" if note else label

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        kwargs["form"] = ApiKeyCreateForm if obj is None else ApiKeyExpiryForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {**super().get_changeform_initial_data(request), "expires_at": api_key_default_expiry()}

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return self.readonly_fields if obj is not None else []

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [*self.readonly_fields, "expires_at"] if obj is not None else ["project", "name", "scopes", "expires_at"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_change_permission(request, obj)
        if obj is None:
            return allowed
        return allowed and obj.revoked_at is None and may_change(request, obj.project_id, Role.ADMIN)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sessions_app.change_apikey")

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        require_role(request, [obj.project_id], Role.ADMIN)
        if change:
            saved = api_key_set_expiry(api_key=obj, expires_at=form.cleaned_data["expires_at"], actor=request.user)
            obj.expires_at = saved.expires_at
            return
        # The form showed the default expiry already: what comes back (empty too) is the choice.
        created, token = api_key_create(
            project=obj.project, name=obj.name, scopes=form.cleaned_data["scopes"],
            expires_at=form.cleaned_data["expires_at"], actor=request.user,
        )
        obj.pk, obj.prefix, obj.created_at = created.pk, created.prefix, created.created_at
        messages.warning(request, f"Copy this key now; it is not shown again: {token}")

    @admin.action(description="Revoke selected API keys…", permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> TemplateResponse | None:
        """Asks first, as a deletion does: a revoked key stays revoked, and an engine using it stops."""
        keys = list(queryset.select_related("project").order_by("project__slug", "name")[: CONFIRMED_IN_REQUEST + 1])
        if len(keys) > CONFIRMED_IN_REQUEST:
            messages.error(request, f"Select at most {CONFIRMED_IN_REQUEST:,} keys at a time (filter the list to "
                                    "narrow it): nothing was revoked.")
            return None
        require_role(request, [api_key.project_id for api_key in keys], Role.ADMIN)  # all or none
        working = [api_key for api_key in keys if api_key.revoked_at is None]
        if request.POST.get("post") != "yes":
            return TemplateResponse(request, "admin/sessions_app/apikey/revoke_confirmation.html", {
                **self.admin_site.each_context(request), "opts": self.model._meta, "title": "Revoke API keys",
                "keys": keys, "working": working, "already": [api_key for api_key in keys if api_key.revoked_at],
                "action_checkbox_name": ACTION_CHECKBOX_NAME,
            })
        gone = []
        for api_key in working:
            try:
                api_key_revoke(api_key=api_key, actor=request.user)
            except NotFound:  # deleted (by a script; the admin cannot) since the list was read
                gone.append(api_key.name)
        messages.success(request, f"Revoked {len(working) - len(gone)} key(s)."
                                  + (f" {len(keys) - len(working)} were revoked already." if len(keys) > len(working) else "")
                                  + (f" Deleted meanwhile, so not revoked: {', '.join(gone)}." if gone else ""))
        return None


class JsonTextField(forms.CharField):
    """JSON typed into a textarea, parsed as strictly as a snapshot's (orjson: no NaN or Infinity, no
    nesting past its limit, where json.loads would take NaN or overflow the stack). `kind` is the type
    the value must have."""

    widget = forms.Textarea(attrs={"rows": 6, "cols": 80, "style": "font-family:monospace"})

    def __init__(self, *, kind: type, **kwargs: Any) -> None:
        self.kind = kind
        super().__init__(strip=False, **kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, (dict, list)):
            return json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)
        return value

    def to_python(self, value: Any) -> Any:
        text = super().to_python(value) or ""
        if not text.strip():
            return self.kind()
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise forms.ValidationError(f"not valid JSON: {decode_error_words(exc, text.encode())}") from None
        if not isinstance(parsed, self.kind):
            raise forms.ValidationError(f"must be a JSON {'object' if self.kind is dict else 'list'}")
        try:
            refuse_huge_integers(text)  # (orjson read 2**70 as a float, named as one the operator never typed)
            refuse_duplicate_keys(text, what="it", value=parsed)
        except InvalidState as exc:
            raise forms.ValidationError(exc.message) from None
        return parsed

    def has_changed(self, initial: Any, data: Any) -> bool:
        # As JSON, not as Python values: 1 == 1.0 == True, and a change from 1 to true was not saved.
        try:
            return not same_json(self.kind() if initial is None else initial, self.to_python(data))
        except forms.ValidationError:
            return True


def _service_checked(clean: Any, value: Any) -> Any:
    try:
        return clean(value)
    except InvalidState as exc:
        raise forms.ValidationError(exc.message) from None


class SessionFixForm(forms.ModelForm):
    """What staff correct on a session (a status left `running` by a dead engine, a bad tag or metadata
    value): the fields the API's PATCH changes, checked by the same services, recorded by session_update."""

    metadata = JsonTextField(kind=dict, required=False, help_text="A JSON object. Empty: {}.")
    tags = JsonTextField(kind=list, required=False,
                         help_text='A JSON list of strings, e.g. ["nightly", "retention:keep-all"]. Empty: [].')

    # The editable fields as the page showed them (a digest of each): the form compares what was posted
    # with the session as it is now, so a status its engine changed after the page was opened read as
    # the operator's change, and a save of the tags alone set it back, audited as theirs.
    seen = forms.CharField(widget=forms.HiddenInput, required=False)

    class Meta:
        model = WorkflowSession
        fields = ["workflow", "status", "metadata", "tags"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["seen"].initial = ",".join(f"{name}:{mark}" for name, mark in _field_marks(self.instance).items())

    # Only what changed is checked and saved: a status fix is not refused for metadata stored under
    # an older, larger SESSION_METADATA_MAX_BYTES.
    def clean_metadata(self) -> Any:
        value = self.cleaned_data.get("metadata")
        return value if same_json(value, self.instance.metadata) else _service_checked(clean_metadata, value)

    def clean_tags(self) -> Any:
        value = self.cleaned_data.get("tags")
        return value if same_json(value, self.instance.tags) else _service_checked(clean_tags, value)

    def clean(self) -> Any:
        cleaned = super().clean()
        try:
            ensure_writable(self.instance)
        except StateStoreError as exc:
            raise forms.ValidationError(exc.message) from None
        seen = dict(mark.partition(":")[::2] for mark in (self.cleaned_data.get("seen") or "").split(",") if mark)
        now = _field_marks(self.instance)
        moved = [name for name in SESSION_FIXED_FIELDS if name in seen and seen[name] != now[name]]
        if moved:
            shown = "; ".join(f"{name} is now {_shown(getattr(self.instance, name))}" for name in moved)
            raise forms.ValidationError(
                f"This session changed since this page was opened (its engine or someone else wrote it): {shown}. "
                "Nothing was saved: reload the page to see it as it is, then make your change again."
            )
        return cleaned


SESSION_FIXED_FIELDS = tuple(SessionFixForm.Meta.fields)


def _field_marks(session: WorkflowSession) -> dict[str, str]:
    """A digest of each field the form edits, by name (what the page carries in `seen`)."""
    return {name: hashlib.blake2b(orjson.dumps(getattr(session, name), option=orjson.OPT_SORT_KEYS), digest_size=6).hexdigest()
            for name in SESSION_FIXED_FIELDS}


def _shown(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ArchiveReasonForm(forms.Form):
    # Not stripped here: the audit event keeps what was typed (the dashboard's archive does the same).
    reason = forms.CharField(required=False, max_length=REASON_MAX, strip=False)


@admin.register(WorkflowSession)
class WorkflowSessionAdmin(ReadOnlyAdmin):
    """Sessions are listed as history, but an operator of the project (with the change permission)
    corrects a session's status, workflow, metadata and tags on its page, audited as session.update."""

    form = SessionFixForm
    fields = ["project", "external_id", "dashboard", "workflow", "status", "metadata", "tags", "seen", "head_number",
              "version_count", "last_step", "last_error", "logical_bytes", "stored_bytes", "created_by",
              "created_at", "updated_at", "archived_at"]
    list_display = ["external_id", "project", "workflow", "status", "head_number", "version_count", "updated_at",
                    "dashboard"]
    list_filter = ["status", ("project", ProjectListFilter), ("archived_at", admin.EmptyFieldListFilter)]
    search_fields = ["external_id", "workflow"]
    list_select_related = ["project"]
    # Recently updated first within each project: the order of the session_project_updated index, so a
    # page is an index scan, not a sort of every session (which a plain -updated_at would be).
    ordering = ["project_id", "-updated_at", "-id"]
    readonly_fields = ["project", "external_id", "dashboard", "head_number", "version_count", "last_step", "last_error",
                       "logical_bytes", "stored_bytes", "created_by", "created_at", "updated_at", "archived_at"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = admin.ModelAdmin.has_change_permission(self, request, obj)
        return allowed and (obj is None or may_change(request, obj.project_id, Role.OPERATOR))

    actions = ["archive", "unarchive"]

    @admin.action(description="Archive selected sessions…", permissions=["change"])
    def archive(self, request: HttpRequest, queryset: QuerySet[WorkflowSession]) -> TemplateResponse | None:
        """Asks first, as the session page does: an archived session refuses its engine's next write."""
        return self._archiving(request, queryset, archive=True)

    @admin.action(description="Unarchive selected sessions…", permissions=["change"])
    def unarchive(self, request: HttpRequest, queryset: QuerySet[WorkflowSession]) -> TemplateResponse | None:
        return self._archiving(request, queryset, archive=False)

    def _archiving(self, request: HttpRequest, queryset: QuerySet[WorkflowSession], *, archive: bool) -> Any:
        selected = queryset.order_by()
        # It changes the sessions: the operator role in each of their projects, as on the session page.
        require_role(request, selected.values_list("project_id", flat=True).distinct(), Role.OPERATOR)
        sessions = list(selected.select_related("project").order_by("project__slug", "external_id")[: CONFIRMED_IN_REQUEST + 1])
        if len(sessions) > CONFIRMED_IN_REQUEST:
            messages.error(request, f"Select at most {CONFIRMED_IN_REQUEST:,} sessions at a time (filter the list to "
                                    "narrow it): nothing was changed.")
            return None
        to_change = [session for session in sessions if (session.archived_at is None) is archive]
        unchanged = len(sessions) - len(to_change)
        form = ArchiveReasonForm(request.POST if request.POST.get("post") == "yes" else None)
        if not form.is_bound or not form.is_valid():
            verb = "archive" if archive else "unarchive"
            return TemplateResponse(request, "admin/sessions_app/workflowsession/archive_confirmation.html", {
                **self.admin_site.each_context(request), "opts": self.model._meta,
                "title": f"{verb.capitalize()} sessions", "archive": archive, "verb": verb, "sessions": sessions,
                "to_change": to_change, "unchanged": unchanged,
                "active": [session for session in to_change
                           if session.status in (SessionStatus.RUNNING, SessionStatus.WAITING)],
                "form": form, "action_checkbox_name": ACTION_CHECKBOX_NAME, "action": verb,
            }, status=400 if form.is_bound else 200)
        change = session_archive if archive else session_unarchive
        gone = []
        for session in to_change:
            try:
                change(session=session, reason=form.cleaned_data["reason"], actor=request.user)
            except NotFound:  # deleted since the confirmation page (by the API, another operator): the rest go on
                gone.append(session.external_id)
        done = "Archived" if archive else "Unarchived"
        messages.success(request, f"{done} {len(to_change) - len(gone)} session(s)."
                                  + (f" {unchanged} were {done.lower()} already: left as they were." if unchanged else "")
                                  + (f" Deleted meanwhile, so not {done.lower()}: {', '.join(gone)}." if gone else ""))
        return None

    def save_model(self, request: HttpRequest, obj: WorkflowSession, form: Any, change: bool) -> None:
        require_role(request, [obj.project_id], Role.OPERATOR)
        session_update(session=obj, actor=request.user,
                       **{name: form.cleaned_data[name] for name in SESSION_FIXED_FIELDS if name in form.changed_data})

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        # A session id pasted into the search box (from a session page's address or the API) finds its
        # session too, though it matches none of the searched columns.
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        session_id = pasted_uuid(search_term)
        return (found if session_id is None else found | queryset.filter(pk=session_id)), may_have_duplicates

    @admin.display(description="Dashboard")
    def dashboard(self, obj: WorkflowSession) -> str:
        return format_html('<a href="{}">timeline</a>', reverse("snapshots:session", kwargs={"session_id": obj.pk}))


NAMED_SESSIONS_SEARCHED = 500  # sessions whose name holds a searched term, whose events a search lists


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "action", "actor_label", "project", "session_name", "change", "target_type", "target_id",
                    "reason"]
    # A date filter, not date_hierarchy: its MIN/MAX and DISTINCT day queries read the whole table on
    # every view. `action` has choices, so its filter lists them instead of a DISTINCT over the table.
    list_filter = ["action", ("created_at", admin.DateFieldListFilter), ("project", ProjectListFilter)]
    search_fields = ["target_id", "actor_label", "reason", "session_id"]
    search_help_text = ("A session's or a target's id finds its events at once; other text is searched in every event, "
                        "and as part of a session's name (its external id).")
    list_select_related = ["project"]
    ordering = ["-id"]
    # An event's page said who, what and why but not when: created_at is not editable, so the admin's
    # read-only form left it out.
    fields = ("created_at", "action", "actor_label", "actor", "project", "session_name", "session_id", "change",
              "target_type", "target_id", "reason", "details")
    readonly_fields = fields

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        # What an operator pastes most (a session's UUID, from its page or the API) by the indexes:
        # as a substring of four text columns it read every event, twice (the page and its count).
        session_id = pasted_uuid(search_term)
        if session_id is not None:
            return queryset.filter(Q(session_id=session_id) | Q(target_id=str(session_id))), False
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if term:
            # The name an operator knows a session by ("research-agent-0001" found nothing): the events of
            # sessions so named in the projects shown, and those naming it in their details (a deleted
            # session's deletion, trims, retention).
            projects = Project.objects.all() if request.user.is_superuser else admin_projects(request, self.view_role)
            # Their ids, not a subquery: a list the session_id index serves, beside the trigram indexes
            # (0009, 0015) of the other terms, so the log is never read whole.
            named = list(WorkflowSession.objects.filter(project__in=projects, external_id__icontains=term)
                         .order_by("-updated_at").values_list("pk", flat=True)[:NAMED_SESSIONS_SEARCHED + 1])
            if len(named) > NAMED_SESSIONS_SEARCHED:
                named.pop()
                messages.warning(request, (
                    f"More than {NAMED_SESSIONS_SEARCHED} sessions have “{term[:80]}” in their name: the events listed "
                    f"are those of the {NAMED_SESSIONS_SEARCHED} most recently active (and of any event that names it). "
                    "Search a longer part of the name, or a session's id, to see all of one session's events."))
            found = found | queryset.filter(Q(session_id__in=named) | Q(details__external_id__icontains=term))
        return found, may_have_duplicates

    def get_queryset(self, request: HttpRequest) -> QuerySet[AuditEvent]:
        # Each event's session by name, in the page's one query (session_id is no foreign key: an
        # event outlives its session).
        names = WorkflowSession.objects.filter(pk=OuterRef("session_id")).values("external_id")[:1]
        return super().get_queryset(request).annotate(session_external_id=Subquery(names))

    @admin.display(description="change")
    def change(self, event: AuditEvent) -> str:
        return audit_change(event)  # (its target id, "645", named nothing an operator knows)

    @admin.display(description="session")
    def session_name(self, event: AuditEvent) -> str:
        """The session's name, or as the event recorded it (a deleted session's); its id is the target."""
        recorded = event.details.get("external_id") if isinstance(event.details, dict) else None
        return str(getattr(event, "session_external_id", None) or recorded or "")
