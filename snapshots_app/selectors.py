"""Reads of versions and states that span rows. Every state read is verified (see store)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from typing import Any

import orjson
from django.conf import settings
from django.db import connection
from django.db.models import Max, Min, Q, QuerySet
from django.utils.http import urlencode

from sessions_app import errors
from sessions_app.errors import InvalidState, VersionNotFound
from sessions_app.models import AuditAction, AuditEvent, SessionStatus, WorkflowSession
from sessions_app.strict_json import ascii_int
from snapshots_app import canonical, rows, store, tree
from snapshots_app.diff import DiffResult, diff_trees, diff_values
from snapshots_app.models import IntegrityProblem, Job, JobKind, RemovedWrite, Version, VersionKind


def _version_number(number: Any) -> int:
    """A version number given as an int or as decimal digits (a query parameter). Nothing else:
    int() would also turn 1.9 and True into 1, and "1_0" into 10."""
    if type(number) is int and -(2**63) <= number < 2**63:
        return number
    parsed = ascii_int(number) if isinstance(number, str) else None
    if parsed is not None:
        return parsed
    raise VersionNotFound(f"version {number!r} is not a version number")


def _not_found(session: WorkflowSession, number: int) -> VersionNotFound:
    return VersionNotFound(f"session {session.external_id} has no version {number}", version=number)


def version_get(*, session: WorkflowSession, number: Any) -> Version:
    """Version `number` of `session` (VersionNotFound if there is none), with `session` attached."""
    number = _version_number(number)
    if connection.vendor == "postgresql":
        version = rows.version_by_number(session, number)
    else:
        version = Version.objects.filter(session=session, number=number).first()
        if version is not None:
            version.session = session
    if version is None:
        raise _not_found(session, number)
    return version


def version_pair_diff(
    *, session: WorkflowSession, number: Any, other_session: WorkflowSession | None = None, other_number: Any,
    structural_strings: bool = True,
) -> tuple[Version, Version, DiffResult]:
    """Version `number` of `session`, version `other_number` of `other_session` (default: the same
    session) and their diff (VersionNotFound names a missing end). On PostgreSQL the two ends and
    the top of both trees come in one round trip."""
    other_session = other_session or session
    number, other_number = _version_number(number), _version_number(other_number)
    if connection.vendor != "postgresql" or session.project_id != other_session.project_id:
        a, b = version_get(session=session, number=number), version_get(session=other_session, number=other_number)
        return a, b, version_diff(a, b, structural_strings=structural_strings)
    found_a, found_b, prefetched = rows.version_pair_tree((session, number), (other_session, other_number))
    if found_a is None:
        raise _not_found(session, number)
    if found_b is None:
        raise _not_found(other_session, other_number)
    return found_a, found_b, version_diff(found_a, found_b, structural_strings=structural_strings, prefetched=prefetched)


def version_with_state_bytes(*, session: WorkflowSession, number: Any) -> tuple[Version, bytes]:
    """Version `number` of `session` and its verified canonical state (VersionNotFound if none).
    On PostgreSQL one round trip either way: the head cache's copy (verified) with the version row,
    or the version row with its tree's top levels (any other version, or a head the cache lost)."""
    number = _version_number(number)
    if connection.vendor != "postgresql":
        version = version_get(session=session, number=number)
        return version, store.read_canonical(version)
    if number == session.head_number:
        cached = store.cached_head(session.pk, number)
        if cached is not None:
            version = version_get(session=session, number=number)
            return version, store.verified(version, cached) or store.read_stored(version)
    found, prefetched = rows.version_with_tree(session, number)
    if found is None:
        raise _not_found(session, number)
    return found, store.read_stored(found, prefetched=prefetched)


def version_state_bytes(version: Version) -> bytes:
    """Canonical JSON of the version's state, verified against its checksum."""
    return store.read_canonical(version)


STATES_PAGE_BYTES = 8 * 1024 * 1024


def version_states_bytes(session: WorkflowSession, versions: list[Version]) -> list[bytes]:
    """The verified canonical states of the first of `versions` (one session's), up to about
    STATES_PAGE_BYTES in all and always at least one: a page of states stays a bounded answer."""
    states: list[bytes] = []
    total = 0
    prefetched = store.tree_rows(session.project_id, {bytes(version.root) for version in versions}) if versions else []
    for version in versions:
        if states and total >= STATES_PAGE_BYTES:
            break
        version.session = session  # one session for all: no query per version to find it
        if version.number == session.head_number:
            state = store.read_canonical(version)
        else:
            state = store.read_stored(version, prefetched=prefetched)
        states.append(state)
        total += len(state)
    return states


def version_state(version: Version) -> dict[str, Any]:
    return orjson.loads(store.read_canonical(version))


def written_with_key(session: WorkflowSession, key: str) -> bool:
    """Whether a write with idempotency key `key` made a version of `session` (still there)."""
    return Version.objects.filter(session=session, idempotency_key=key).exists()


def key_known(session: WorkflowSession, key: str) -> bool:
    """Whether a call with idempotency key `key` (a single write's or a batch's) wrote versions of
    `session`, there still or removed since: a retry of it is replayed or refused, never written."""
    keys = [key, rows.batch_key(key, 0)]
    return (Version.objects.filter(session=session, idempotency_key__in=keys).exists()
            or RemovedWrite.objects.filter(session=session, idempotency_key__in=keys).exists())


def head_version(session: WorkflowSession) -> Version | None:
    if session.head_number == 0:
        return None
    return version_get(session=session, number=session.head_number)


def last_step_at(session: WorkflowSession) -> datetime | None:
    """When the engine last wrote a step (rewinds, forks, data fixes and imports are operators')."""
    steps = Version.objects.filter(session=session, kind=VersionKind.STEP).order_by("-number")
    return steps.values_list("created_at", flat=True).first()


# The statuses in which a page that changes the head warns that an engine may still be writing to the
# session: at work, or waiting for input (once it arrives, the engine writes its next step from its
# memory: over a rewind or a data fix, or into an archive's refusal).
ENGINE_MAY_WRITE = frozenset({SessionStatus.RUNNING, SessionStatus.WAITING})


def engine_active(session: WorkflowSession) -> datetime | bool | None:
    """For the confirm pages' warning: when the engine last wrote a step (True before its first), if the
    session's status says it may still be writing; None otherwise. Not the head's time: a colleague's
    rewind a moment ago read as an engine at work."""
    if session.status not in ENGINE_MAY_WRITE:
        return None
    return last_step_at(session) or True


def version_diff(
    a: Version, b: Version, *, structural_strings: bool = True, prefetched: Iterable[store.NodeRow] = (),
    source: store.ProjectStore | None = None,
) -> DiffResult:
    """Diff any two versions of one project (also across sessions, e.g. a fork and its source).
    `prefetched`: node rows already fetched along with the versions (see version_pair_diff).
    `source`: a diff store (diff_source) shared by several diffs, holding what they fetched."""
    if a.session.project_id != b.session.project_id:
        raise InvalidState("versions of different projects cannot be compared")
    # Every node the walk uses is checked against its seal (store.ProjectStore.nodes), so the diff
    # never needs to splice and hash both whole states: its cost follows the change.
    source = source or diff_source(a.session.project_id)
    source.keep_rows(prefetched)
    try:
        return diff_trees(bytes(a.root), bytes(b.root), source, structural_strings=structural_strings)
    except (tree.MissingNode, store.CorruptNode) as exc:
        # Name the damaged version, as a read of it would; a full read of each end finds out which.
        for version in (a, b):
            store.read_canonical(version)
        raise errors.IntegrityProblem(
            f"versions {a.number} and {b.number} cannot be compared ({exc}); the diff will not be served",
            version=b.number, session=str(b.session_id),
        ) from None


def diff_source(project_id: int) -> store.ProjectStore:
    return store.ProjectStore(project_id, levels=store.DIFF_LEVELS, for_diff=True)


def version_list(session: WorkflowSession, *, before: int | None = None, limit: int = 50) -> list[Version]:
    """Newest first, keyset-paginated by number (fast with any number of versions)."""
    queryset = session_versions(session)
    if before is not None:
        queryset = queryset.filter(number__lt=before)
    return list(queryset[:limit])


def newest_version_numbers(session: WorkflowSession, count: int) -> list[int]:
    """The numbers of the session's `count` newest versions (the head first)."""
    return list(Version.objects.filter(session=session).order_by("-number").values_list("number", flat=True)[:count])


def forks_from(session: WorkflowSession) -> QuerySet[Version]:
    """The first versions of the sessions forked from this one's versions (their parents are those)."""
    return Version.objects.filter(parent__session=session, kind=VersionKind.FORK).exclude(session=session)


@dataclass(frozen=True)
class TrimPlan:
    """What a trim keeping the numbers `wanted` does: see services.session_trim."""

    ids: dict[int, int]  # number -> id, of every version of the session
    kept: set[int]
    protected: set[int]  # kept although not asked for: pinned, labelled, a fork's or a kept rewind's source

    @property
    def removed(self) -> list[int]:
        return sorted(self.ids.keys() - self.kept)


def trim_plan(session: WorkflowSession, wanted: set[int]) -> TrimPlan:
    """Which versions a trim that keeps `wanted` removes (the service's plan under the session's lock,
    and the confirm page's preview). What an operator marked, versions another session was forked
    from and what kept rewinds restored stay, as retention keeps them."""
    ids: dict[int, int] = {}
    rewinds: dict[int, int | None] = {}  # a rewind's number -> the id of what it restored
    marked: set[int] = set()  # pinned or labelled
    # The parent's id, not parent__number: that join hashed the whole versions table (0.5 s of a 0.9 s
    # page at 450,000 versions); a rewind restores a version of its own session, whose ids are here.
    for number, version_id, kind, parent_id, pinned, label in Version.objects.filter(session=session).values_list(
        "number", "id", "kind", "parent_id", "pinned", "label"
    ):
        ids[number] = version_id
        if kind == VersionKind.REWIND:
            rewinds[number] = parent_id
        if pinned or label:
            marked.add(number)
    number_of = {version_id: number for number, version_id in ids.items()}
    restores = {number: number_of.get(parent_id) for number, parent_id in rewinds.items() if parent_id is not None}
    kept = (wanted & ids.keys()) | marked | set(forks_from(session).values_list("parent__number", flat=True))
    # A kept rewind keeps what it restored (and that, if a rewind, its own): as retention keeps rewind
    # sources, so the timeline still says which version it went back to.
    restoring = [number for number in kept if number in restores]
    while restoring:
        source = restores[restoring.pop()]
        if source in ids and source not in kept:
            kept.add(source)
            if source in restores:
                restoring.append(source)
    return TrimPlan(ids=ids, kept=kept, protected=kept - wanted)


def session_versions(session: WorkflowSession) -> QuerySet[Version]:
    return (
        Version.objects.filter(session=session)
        .select_related("parent__session", "created_by")
        .order_by("-number")
    )


TIMELINE_PAGE = 50
HISTORY_WINDOW = 100

_KIND_PLURALS: dict[str, str] = {VersionKind.REWIND: "rewinds", VersionKind.FORK: "forks (to or from here)",
                                 VersionKind.DATA_FIX: "data fixes"}


@dataclass(frozen=True)
class TimelineFilters:
    """Which versions a timeline shows: those with an error, pinned, labelled, of one of the kinds an
    operator makes (TIMELINE_KINDS); every filter chosen at once. Each has a partial index of its own
    (Version.Meta.indexes), so a page of them reads only versions it shows, however long the session."""

    has_error: bool = False
    pinned: bool = False
    labelled: bool = False
    kind: str = ""  # one of TIMELINE_KINDS, or "" for any

    @property
    def active(self) -> bool:
        return self.has_error or self.pinned or self.labelled or bool(self.kind)

    def condition(self, session: WorkflowSession) -> Q:
        condition = Q()
        if self.has_error:
            condition &= ~Q(error="")
        if self.pinned:
            condition &= Q(pinned=True)
        if self.labelled:
            condition &= ~Q(label="")
        if self.kind == VersionKind.FORK:
            # A fork's first version is in the new session: on its source, "forks" showed "No forks." The
            # versions forked from here show too (read among the operators' versions, version_operator_kind).
            parents = forks_from(session).order_by().values_list("parent_id", flat=True).distinct()
            condition &= Q(kind=self.kind) | Q(pk__in=list(parents))
        elif self.kind:
            condition &= Q(kind=self.kind)
        return condition

    def matches(self, version: Version) -> bool:
        """Whether the timeline shows `version` (condition(), for a version at hand: a live update's)."""
        return ((not self.has_error or version.error != "") and (not self.pinned or version.pinned)
                and (not self.labelled or version.label != "") and (not self.kind or version.kind == self.kind))

    @property
    def query(self) -> str:
        """The filters as the timeline's address has them (its links, its live socket's), "" for none."""
        params = [(name, "true") for name in ("has_error", "pinned", "labelled") if getattr(self, name)]
        return urlencode([*params, *([("kind", self.kind)] if self.kind else [])])

    @property
    def described(self) -> str:
        """What the timeline shows, as words: "pinned, labelled rewinds with an error"."""
        marks = [word for word, chosen in (("pinned", self.pinned), ("labelled", self.labelled)) if chosen]
        words = [", ".join(marks), _KIND_PLURALS.get(self.kind, "versions"), "with an error" if self.has_error else ""]
        return " ".join(word for word in words if word)


def timeline_page(
    session: WorkflowSession, *, before: int | None = None, limit: int = TIMELINE_PAGE,
    filters: TimelineFilters | None = None,
) -> list[Version]:
    """Newest first by number (keyset on version_unique_number, or a filter's own index); each version
    carries `forks_out`: the fork sessions started from it, fetched for the whole page in one query."""
    if filters is None or not filters.active:
        return _with_forks_out(session, version_list(session, before=before, limit=limit))
    queryset = session_versions(session).filter(filters.condition(session))
    if before is not None:
        queryset = queryset.filter(number__lt=before)
    return _with_forks_out(session, list(queryset[:limit]))


def timeline_page_showing(session: WorkflowSession, number: int) -> int | None:
    """The `before` of the (unfiltered) timeline page that shows version `number` on top, or None if
    the newest page shows it: where a way back to the version's row leads (counted in versions, not
    numbers: retention leaves gaps)."""
    newer = Version.objects.filter(session=session, number__gt=number).order_by("number").values_list("number", flat=True)
    return number + 1 if list(newer[TIMELINE_PAGE - 1 : TIMELINE_PAGE]) else None


def version_at_or_before(session: WorkflowSession, *, number: int | None = None, moment: datetime | None = None) -> int | None:
    """The newest version numbered at most `number` (retention leaves gaps), or written at or before
    `moment`: the state the session had then. None if there is none."""
    versions = Version.objects.filter(session=session)
    if number is not None:
        versions = versions.filter(number__lte=number)
    if moment is not None:
        versions = versions.filter(created_at__lte=moment)
    found: int | None = versions.order_by("-number").values_list("number", flat=True).first()
    return found


def data_fix_base(version: Version) -> int | None:
    """The version a data fix edited (its parent is the head it was written on; its audit event names
    the base), or None if the event is gone."""
    details = (AuditEvent.objects.filter(action=AuditAction.VERSION_DATA_FIX, target_type="version",
                                         target_id=str(version.pk))
               .values_list("details", flat=True).first())
    based_on = details.get("based_on") if isinstance(details, dict) else None
    return based_on if isinstance(based_on, int) else None


def timeline_rows(session: WorkflowSession, numbers: Collection[int]) -> list[Version]:
    """The timeline rows of these versions of the session (those that still exist), newest first."""
    return _with_forks_out(session, list(session_versions(session).filter(number__in=list(numbers))))


def _with_forks_out(session: WorkflowSession, versions: list[Version]) -> list[Version]:
    forks: dict[int | None, list[Version]] = {}
    if versions:
        children = (
            Version.objects.filter(parent_id__in=[v.pk for v in versions], kind=VersionKind.FORK)
            .exclude(session=session)
            .select_related("session")
            .only("parent_id", "number", "created_by_label", "reason", "session__external_id", "session__id")
        )
        for child in children:
            forks.setdefault(child.parent_id, []).append(child)
    for version in versions:
        version.forks_out = forks.get(version.pk, [])  # type: ignore[attr-defined]
    return versions


def version_before(session: WorkflowSession, number: int) -> Version | None:
    """The session's newest version below `number` (None if it has none): the version "previous"
    means, which is not number - 1 once retention has removed the versions between."""
    return (
        Version.objects.select_related("session__project", "parent__session", "created_by")
        .filter(session=session, number__lt=number)
        .order_by("-number")
        .first()
    )


def version_span(session: WorkflowSession) -> tuple[int, int] | None:
    """The numbers of the session's oldest and newest versions (None if it has none)."""
    span = Version.objects.filter(session=session).aggregate(oldest=Min("number"), newest=Max("number"))
    return None if span["newest"] is None else (span["oldest"], span["newest"])


def version_for_session(session: WorkflowSession, number: Any) -> Version:
    """A version of the session, with what its lineage display needs (raises VersionNotFound). The
    number as the pages write it ("v5") is taken too."""
    if isinstance(number, str):
        number = number.strip().removeprefix("v").removeprefix("V")
    try:
        number = int(number)
    except (TypeError, ValueError):
        raise VersionNotFound(f"{number!r} is not a version number") from None
    version = (
        Version.objects.select_related("session__project", "parent__session", "created_by")
        .filter(session=session, number=number)
        .first()
    )
    if version is None:
        raise VersionNotFound(f"session {session.external_id} has no version {number}", version=number)
    return version


def changes_undoing(session: WorkflowSession, since: int, head_value: Any, result: DiffResult) -> list[str]:
    """The paths of `result` (a diff from the head's state, `head_value`) that set back what was written
    after version `since` (an engine's step while a data fix was being edited): equal, inside or around
    a path that changed from `since` to the head. [] when `since` is gone or damaged."""
    try:
        then = version_state(version_get(session=session, number=since))
    except errors.StateStoreError:
        return []
    moved = [change["path"] for change in diff_values(then, head_value).changes]
    return [change["path"] for change in result.changes
            if any(change["path"] == path or change["path"].startswith(path + "/") or path.startswith(change["path"] + "/")
                   for path in moved)]


def open_integrity_problem(version: Version) -> IntegrityProblem | None:
    """The version's open integrity problem, if the scrub (or an admin check) recorded one."""
    return IntegrityProblem.objects.filter(version=version, resolved_at__isnull=True).first()


def integrity_problems(session: WorkflowSession, *, limit: int = 20) -> list[IntegrityProblem]:
    """The session's open integrity problems, newest first (recorded by the scrub or an admin check)."""
    return list(
        IntegrityProblem.objects.filter(session=session, resolved_at__isnull=True).order_by("-last_seen_at", "-id")[:limit]
    )


@dataclass(frozen=True)
class PathPoint:
    number: int
    value: Any  # a number, boolean, null or short string; None for a container or a long string (see `shown`)
    present: bool
    changed: bool
    created_at: Any
    step: str
    shown: str  # what the row shows of it (jsonview.preview)


def _point(version: Version, value: Any, present: bool, changed: bool, shown: str | None = None) -> PathPoint:
    """A row of a path history, holding only what it shows: the value itself only when small. A 9 MB
    list held by each of 100 rows took a web process to gigabytes (parsed, each is several times that)."""
    from snapshots_app.jsonview import PREVIEW_CHARS, preview

    small = type(value) not in (dict, list) and not (type(value) is str and len(value) > PREVIEW_CHARS)
    return PathPoint(version.number, value if small else None, present, changed, version.created_at, version.step,
                     shown if shown is not None else preview(value)[0] if present else "")


def path_history(
    session: WorkflowSession, pointer: str, *, before: int | None = None, window: int = HISTORY_WINDOW
) -> list[PathPoint]:
    """The value at `pointer` in each of up to `window` versions (oldest first), and whether it
    changed from the previous version. Reads one full state, then follows the diffs between
    neighbours, applying what they change at or under the pointer, so the cost follows what changed,
    not the state size times the number of versions. A change it cannot follow (an item added or
    removed before the pointer in an array it goes through) reads that version's state."""
    from snapshots_app.jsonview import PointerError, resolve

    versions = list(reversed(version_list(session, before=before, limit=window)))
    if not versions:
        return []
    for version in versions:
        version.session = session

    def value_in(version: Version) -> tuple[Any, bool]:
        try:
            return resolve(version_state(version), pointer), True
        except PointerError:
            return None, False

    at = _PathValue(pointer, *value_in(versions[0]))
    points = [_point(versions[0], at.value, at.present, False)]
    # One store for the window's diffs, with the top levels of every tree in it fetched in one round
    # trip: on a process whose node cache had none of them, each diff fetched its own (107 queries,
    # 0.5-0.66 s for 100 distinct 90 KB states).
    source = diff_source(session.project_id)
    source.keep_rows(store.tree_rows(session.project_id, {bytes(version.root) for version in versions}))
    for previous, version in pairwise(versions):
        touched = False
        if previous.checksum != version.checksum:
            try:
                touched = at.follow(version_diff(previous, version, source=source).patch)
            except _Reread as reread:
                # What the previous version held: the value followed so far, unless the patch had
                # already changed it before it gave up (then compared with it, an edit and a shift in
                # one version read as no change), when it is read again from that version.
                was = _reading(*value_in(previous)) if reread.after_changes else at.reading()
                at = _PathValue(pointer, *value_in(version))
                touched = was != at.reading()
        last = points[-1]
        points.append(_point(version, at.value, at.present, True) if touched else
                      _point(version, last.value, last.present, False, last.shown))
    return points


class _Reread(Exception):
    """A diff changed the path in a way _PathValue cannot follow: read the version's state instead.
    `after_changes`: the patch had changed the value followed before it gave up."""

    def __init__(self, after_changes: bool) -> None:
        super().__init__()
        self.after_changes = after_changes


def _index_token(token: str) -> bool:
    """An array index as RFC 6901 writes it (ASCII digits, no leading zero: str.isdigit() takes "²")."""
    return token.isascii() and token.isdigit() and (token == "0" or not token.startswith("0"))


class _PathValue:
    """The value at a pointer, carried from version to version by the JSON Patch between them.

    Held parsed, one at a time (the rows keep only what they show). It may be shared with a cached
    state or a diff's values, so it is copied before its first change in place."""

    def __init__(self, pointer: str, value: Any, present: bool) -> None:
        self.pointer, self.value, self.present, self.owned = pointer, value, present, False
        # A pointer naming an index unlike the diff's paths ("/h/02", which a read takes as /h/2)
        # matches none of them: such a one is read again at every version that changed.
        self.followable = all(_index_token(token) or not token[:1].isdigit() for token in pointer.split("/")[1:])

    def reading(self) -> tuple[bool, bytes]:
        return _reading(self.value, self.present)

    def follow(self, patch: list[dict[str, Any]]) -> bool:
        """Apply the patch's operations at, above or under the pointer, in order; whether the value
        changed. _Reread when an operation moves the pointer onto another item (one removed at or
        above it, or added or removed before it in an array the pointer goes through)."""
        from snapshots_app.diff import PatchError, apply_patch, json_copy
        from snapshots_app.jsonview import PointerError, resolve

        pointer, touched = self.pointer, False
        if not self.followable:
            raise _Reread(False)
        for operation in patch:
            path, op = operation["path"], operation["op"]
            parent, _, last = path.rpartition("/")
            if path == pointer or pointer.startswith(path + "/") or path == "":
                if op == "remove" and _index_token(last):
                    raise _Reread(touched)  # the item after it takes its place
                was = self.reading()
                if op == "remove":
                    self.value, self.present = None, False
                else:  # the value added or put there, or the part of it the pointer goes on into
                    try:
                        self.value, self.present = resolve(operation["value"], pointer[len(path):]), True
                    except PointerError:
                        self.value, self.present = None, False
                self.owned = False
                touched = touched or was != self.reading()
            elif path.startswith(pointer + "/"):
                if not self.present:
                    raise _Reread(touched)
                # The operation, re-rooted at the pointer, applied in place to a value of our own (its
                # value copied too: the diff's values may be a cache's).
                relative = {"op": op, "path": path[len(pointer):]}
                if op != "remove":
                    relative["value"] = json_copy(operation["value"])
                try:
                    self.value = apply_patch(self.value, [relative], copy=_same if self.owned else json_copy)
                except (PatchError, TypeError):
                    raise _Reread(touched) from None
                self.owned = touched = True
            elif op != "replace" and _index_token(last) and pointer.startswith(parent + "/"):
                # An item added or removed in an array the pointer goes through: before the pointer's
                # item (or at it) it shifts that item; after it, it changes nothing here (nor in an
                # object, whose member the pointer names by a key that is no index).
                mine = pointer[len(parent) + 1:].partition("/")[0]
                if _index_token(mine) and int(last) <= int(mine):
                    raise _Reread(touched)
        return touched


def _same(value: Any) -> Any:
    return value


def _reading(value: Any, present: bool) -> tuple[bool, bytes]:
    """What a path history row shows, comparable: equal JSON gives equal digests (Python's 1 == 1.0 ==
    True would call a changed type unchanged). A digest, not the bytes: a row keeps it until the next."""
    return present, hashlib.blake2b(canonical.dumps(value), digest_size=16).digest() if present else b""


SESSION_EXPORTS_SHOWN = 3


@dataclass(frozen=True)
class SessionExport:
    job: Job
    condition: str | None  # where an unfinished job stands, in words (jobs.job_condition)
    size: int | None  # the finished file's bytes; None while unfinished, or once the file is gone


@dataclass(frozen=True)
class SessionExports:
    items: list[SessionExport]
    keep_days: int  # how long a file is kept (EXPORT_KEEP_DAYS)

    @property
    def unfinished(self) -> bool:
        return any(not export.job.is_finished for export in self.items)


def session_export_job(session: WorkflowSession, job_id: int) -> Job | None:
    """The export job `job_id` of this session (None if it is not one of its exports)."""
    return Job.objects.filter(pk=job_id, session=session, kind=JobKind.EXPORT).first()


def session_exports(session: WorkflowSession) -> SessionExports:
    """The session's newest exports (SESSION_EXPORTS_SHOWN), newest first, for its page: how far each
    got, and whether a finished one's file is still there to download (EXPORT_KEEP_DAYS)."""
    from snapshots_app import jobs, transfer

    shown = []
    for job in Job.objects.filter(session=session, kind=JobKind.EXPORT).order_by("-created_at", "-id")[:SESSION_EXPORTS_SHOWN]:
        try:
            size: int | None = transfer.export_file(job=job).stat().st_size
        except (InvalidState, FileNotFoundError):
            size = None
        shown.append(SessionExport(job=job, condition=jobs.job_condition(job), size=size))
    return SessionExports(items=shown, keep_days=settings.EXPORT_KEEP_DAYS)
