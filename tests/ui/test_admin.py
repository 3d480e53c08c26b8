"""The admin as staff use it for data fixes: read-only history, keys shown once, audited fixes."""

from __future__ import annotations

import html
import json
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from sessions_app.models import ApiKey, AuditEvent, Membership, Role, WorkflowSession
from sessions_app.services import api_key_create, api_key_revoke, membership_set, session_archive, session_update
from snapshots_app.integrity import integrity_problem_record
from snapshots_app.models import IntegrityProblem, Job, StateNode, Version
from snapshots_app.services import snapshot_record
from tests.api.conftest import key_client
from tests.conftest import clear_cache
from tests.factories import make_project, make_session, make_user
from tests.locks import someone_waits_on_a_lock
from tests.ui.conftest import record_history

User = get_user_model()


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_superuser("root", password="pw-for-tests-1")


@pytest.mark.parametrize("model", ["sessions_app/project", "sessions_app/membership", "sessions_app/apikey",
                                   "sessions_app/workflowsession", "sessions_app/auditevent",
                                   "snapshots_app/version", "snapshots_app/integrityproblem", "snapshots_app/job",
                                   "snapshots_app/retentionpolicy"])
def test_every_changelist_opens_and_searches(client, staff, story, model):
    client.force_login(staff)
    response = client.get(f"/admin/{model}/", {"q": "run"})
    assert response.status_code == 200


def test_non_staff_cannot_enter(client, operator):
    client.force_login(operator)
    assert client.get("/admin/snapshots_app/version/").status_code == 302


def test_versions_are_read_only(client, staff, story):
    client.force_login(staff)
    version = Version.objects.get(session=story, number=2)
    url = reverse("admin:snapshots_app_version_change", args=[version.pk])
    page = client.get(url).content.decode()
    assert 'name="_save"' not in page
    assert page.count(">Session:</label>") == 1 and f"{story.external_id}</a>" in page  # once, as a link
    assert client.post(url, {"step": "edited"}).status_code == 403
    assert client.post(reverse("admin:snapshots_app_version_delete", args=[version.pk])).status_code == 403
    version.refresh_from_db()
    assert version.step == "step-2"


def test_api_key_is_shown_once_and_revoked_by_action(client, staff, team):
    client.force_login(staff)
    response = client.post(reverse("admin:sessions_app_apikey_add"),
                           {"project": team.pk, "name": "ci", "scopes": ["read", "write"]}, follow=True)
    page = response.content.decode()
    key = ApiKey.objects.get(name="ci")
    token = page.split("it is not shown again: ")[1].split("<")[0].strip()
    assert token.startswith(f"sr_{key.prefix}_") and token not in key.key_hash
    shown = client.get(reverse("admin:sessions_app_apikey_change", args=[key.pk])).content.decode()
    assert token not in shown
    assert '<div class="readonly">read, write</div>' in shown and "[&quot;read&quot;" not in shown  # words, not JSON
    client.post(reverse("admin:sessions_app_apikey_changelist"),
                {"action": "revoke", "_selected_action": [key.pk], "post": "yes"})
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert AuditEvent.objects.filter(action="api_key.revoke").exists()


def test_revoking_keys_in_the_admin_asks_first_and_names_them(client, staff, team):
    """A revoked key stays revoked and the engine using it stops at once: the action shows which keys
    (and when each was last used) and revokes only once confirmed, as a deletion does."""
    client.force_login(staff)
    engine, _ = api_key_create(project=team, name="prod-engine", scopes=["write"])
    old, _ = api_key_create(project=team, name="old-engine", scopes=["read"])
    api_key_revoke(api_key=old)
    changelist = reverse("admin:sessions_app_apikey_changelist")
    asked = client.post(changelist, {"action": "revoke", "_selected_action": [engine.pk, old.pk], "index": "0"})
    page = asked.content.decode()
    assert asked.status_code == 200 and "cannot be undone" in page and "prod-engine" in page
    assert "Revoked already, left as they are: old-engine" in page
    assert 'name="post" value="yes"' in page and f'name="_selected_action" value="{engine.pk}"' in page
    engine.refresh_from_db()
    assert engine.revoked_at is None and AuditEvent.objects.filter(action="api_key.revoke").count() == 1

    done = client.post(changelist, {"action": "revoke", "_selected_action": [engine.pk, old.pk], "post": "yes"},
                       follow=True)
    assert "Revoked 1 key(s). 1 were revoked already." in done.content.decode()
    engine.refresh_from_db()
    assert engine.revoked_at is not None and AuditEvent.objects.filter(action="api_key.revoke").count() == 2


def shown_state(response) -> str:
    """The checksum a data fix page carries of the state whose diff it showed (what "record" records)."""
    match = re.search(r'name="previewed" value="(\w+)"', response.content.decode())
    return match.group(1) if match else ""


def test_data_fix_shows_the_diff_requires_a_reason_and_records_a_new_version(client, staff, story):
    client.force_login(staff)
    base = Version.objects.get(session=story, number=2)
    url = reverse("admin:snapshots_app_version_data_fix", args=[base.pk])
    page = client.get(url).content.decode()
    assert "&quot;steps&quot;: 2" in page  # the state, escaped inside the textarea
    edited = {"counters": {"steps": 2, "tokens": 1}, "pointer": "fixed"}
    assert "Record as new head" not in page  # nothing to record before its diff is shown
    preview = client.post(url, {"state": json.dumps(edited), "reason": "", "expected_version": 5, "preview": "1"})
    body = preview.content.decode()
    assert preview.status_code == 200 and "/pointer" in body and "Record as new head" in body
    bad = client.post(url, {"state": "{not json", "reason": "x", "expected_version": 5, "preview": "1"})
    assert bad.status_code == 400 and "not valid JSON" in bad.content.decode()
    assert "Record as new head" not in bad.content.decode()
    no_reason = client.post(url, {"state": json.dumps(edited), "reason": " ", "expected_version": 5, "apply": "1",
                                  "previewed": shown_state(preview)})
    assert no_reason.status_code == 400 and Version.objects.filter(session=story).count() == 5
    done = client.post(url, {"state": json.dumps(edited), "reason": "bad token count", "expected_version": 5,
                             "apply": "1", "previewed": shown_state(preview)})
    assert done.status_code == 302
    fixed = Version.objects.get(session=story, number=6)
    assert fixed.kind == "data_fix" and fixed.reason == "bad token count"
    assert AuditEvent.objects.get(action="version.data_fix").actor_label == "root"


def test_a_data_fix_whose_version_was_removed_meanwhile_gives_the_edit_back_and_an_archived_one_warns_first(
    client, staff, story
):
    """A trim between loading the page and recording answered a bare 404: the edit was lost. An archived
    session's fix was refused only at the last click."""
    from sessions_app.services import session_archive
    from snapshots_app.services import session_trim

    client.force_login(staff)
    base = Version.objects.get(session=story, number=2)
    url = reverse("admin:snapshots_app_version_data_fix", args=[base.pk])
    edited = json.dumps({"counters": {"steps": 2, "tokens": 1}, "pointer": "fixed <by hand>"})
    session_trim(session=story, keep=[5], reason="only the head")
    gone = client.post(url, {"state": edited, "reason": "the pointer was wrong", "expected_version": 5, "preview": "1"})
    page = gone.content.decode()
    assert gone.status_code == 404 and "was removed since the page was loaded" in page
    assert "the pointer was wrong</textarea>" in page
    assert "fixed &lt;by hand&gt;" in page and Version.objects.filter(session=story).count() == 1
    assert client.get(url).status_code == 404

    session_archive(session=story, reason="done", actor=staff)
    head = Version.objects.get(session=story, number=5)
    fix_url = reverse("admin:snapshots_app_version_data_fix", args=[head.pk])
    page = client.get(fix_url).content.decode()
    assert "run-42 is archived: recording a fix is refused until it is unarchived" in page
    # Its diff is still shown (the notice hid it), with no Record button bound to be refused.
    preview = client.post(fix_url, {"state": edited, "reason": "fix", "expected_version": 5, "preview": "1"})
    body = preview.content.decode()
    assert "/pointer" in body and "Record as new head" not in body

def test_a_data_fix_that_leaves_the_heads_state_as_it_is_records_nothing_and_says_so(client, staff, story):
    """A fix whose state is the head's (however it is written: key order, spacing) recorded a new head all
    the same, identical to the one before, and a data_fix audit event for a change that was none."""
    from snapshots_app.selectors import version_state

    client.force_login(staff)
    url = reverse("admin:snapshots_app_version_data_fix", args=[Version.objects.get(session=story, number=2).pk])
    heads = version_state(Version.objects.get(session=story, number=5))
    same = json.dumps(dict(reversed(list(heads.items()))), indent=4)
    preview = client.post(url, {"state": same, "reason": "", "expected_version": 5, "preview": "1"})
    body = preview.content.decode()
    assert preview.status_code == 200 and "No change: this is the state of v5, the head, already." in body
    assert "Record as new head" not in body
    done = client.post(url, {"state": same, "reason": "fix it", "expected_version": 5, "apply": "1",
                             "previewed": shown_state(preview)}, follow=True)
    assert done.redirect_chain == [(url, 302)]
    assert "No change: this is the state of v5, the head of run-42, already. Nothing was recorded." in \
        html.unescape(done.content.decode())
    assert Version.objects.filter(session=story).count() == 5
    assert not AuditEvent.objects.filter(action="version.data_fix").exists()


def test_a_data_fix_to_the_heads_own_state_records_nothing_whoever_asks(story):
    """The rule is the service's, not only the admin page's: the head is answered as it is, not a copy."""
    from snapshots_app.selectors import version_state
    from snapshots_app.services import snapshot_data_fix

    head = Version.objects.get(session=story, number=5)
    answered = snapshot_data_fix(session=story, state=version_state(head), based_on=2, reason="script",
                                 expected_version=5)
    assert answered.pk == head.pk and Version.objects.filter(session=story).count() == 5
    assert not AuditEvent.objects.filter(action="version.data_fix").exists()
    fixed = snapshot_data_fix(session=story, state={**version_state(head), "note": "fixed"}, based_on=2,
                              reason="script", expected_version=5)
    assert fixed.number == 6 and AuditEvent.objects.filter(action="version.data_fix").count() == 1


def test_the_data_fix_diffs_copy_path_buttons_come_with_the_script_that_makes_them_work(client, staff, story):
    """The preview shows the dashboard's diff, whose "copy path" buttons are worked by static/js/app.js:
    the admin's page did not load it, so they were buttons that did nothing."""
    client.force_login(staff)
    url = reverse("admin:snapshots_app_version_data_fix", args=[Version.objects.get(session=story, number=2).pk])
    preview = client.post(url, {"state": json.dumps({"counters": {"steps": 9}}), "reason": "", "expected_version": 5,
                                "preview": "1"}).content.decode()
    assert 'class="copy" data-path="/counters/steps"' in preview
    assert re.search(r'<script src="/static/js/app(\.[0-9a-f]+)?\.js" defer>', preview)


def test_a_data_fix_records_only_the_state_whose_diff_against_the_current_head_was_shown(client, staff, story):
    """Recording needs the diff of exactly that state against the head as it is now: a state edited
    after its preview, or a head that moved since the page was loaded (an engine wrote meanwhile),
    gets an error and the current diff, and nothing is stored until that diff was shown."""
    client.force_login(staff)
    url = reverse("admin:snapshots_app_version_data_fix", args=[Version.objects.get(session=story, number=2).pk])
    edited = json.dumps({"counters": {"steps": 2, "tokens": 1}})
    preview = client.post(url, {"state": edited, "reason": "", "expected_version": 5, "preview": "1"})
    retyped = client.post(url, {"state": json.dumps({"counters": {"steps": 3}}), "reason": "why",
                                "expected_version": 5, "apply": "1", "previewed": shown_state(preview)})
    body = retyped.content.decode()
    assert retyped.status_code == 400 and "diff against the head was not shown yet" in body and "/counters/steps" in body
    unpreviewed = client.post(url, {"state": edited, "reason": "why", "expected_version": 5, "apply": "1"})
    assert unpreviewed.status_code == 400 and "not shown yet" in unpreviewed.content.decode()
    assert Version.objects.filter(session=story).count() == 5

    snapshot_record(session=story, state={"counters": {"steps": 6}, "engine_wrote": "this meanwhile"})
    stale = client.post(url, {"state": edited, "reason": "why", "expected_version": 5, "preview": "1"})
    body = stale.content.decode()
    assert stale.status_code == 400 and "The head is now v6, not v5" in body and "/engine_wrote" in body
    # The lines that set back what the engine wrote meanwhile are named (they read like any other).
    assert "It would undo what was written since v5: /counters/steps, /counters/tokens, /engine_wrote." in body
    assert 'name="expected_version" value="6"' in body
    late = client.post(url, {"state": edited, "reason": "why", "expected_version": 5, "apply": "1",
                             "previewed": shown_state(preview)})
    assert late.status_code == 400 and "The head is now v6" in late.content.decode()
    assert Version.objects.filter(session=story).count() == 6 and not AuditEvent.objects.filter(
        action="version.data_fix").exists()
    done = client.post(url, {"state": edited, "reason": "why", "expected_version": 6, "apply": "1",
                             "previewed": shown_state(stale)})
    assert done.status_code == 302 and Version.objects.get(session=story, number=7).kind == "data_fix"


BIG_DOCS = [{"id": n, "text": "lorem ipsum " * 20} for n in range(5)]


def _big_docs(client, staff, team, monkeypatch, **more: Any) -> tuple[Any, Any, str]:
    """A 1.3 KB state of five 0.3 KB docs (and `more` members), over a whole-state edit limit of 500
    bytes, and its data-fix page, signed in as staff: (session, version, url)."""
    from snapshots_app import admin as snapshots_admin

    monkeypatch.setattr(snapshots_admin, "WHOLE_STATE_EDIT_MAX", 500)
    session = make_session(team, "big-docs")
    base = snapshot_record(session=session, state={"docs": BIG_DOCS, "pointer": "rank", **more})
    client.force_login(staff)
    return session, base, reverse("admin:snapshots_app_version_data_fix", args=[base.pk])


def test_a_large_state_is_fixed_one_part_at_a_time(client, staff, team, monkeypatch):
    """Above the whole-state limit the page offers the state's parts instead of a huge textarea;
    editing one part records the whole state with only that part changed."""
    from snapshots_app.selectors import version_state

    session, _, url = _big_docs(client, staff, team, monkeypatch, **{"memory/notes": ["x"]})
    page = client.get(url).content.decode()
    assert 'name="state"' not in page and "?path=/docs" in page and "?path=/memory~1notes" in page
    assert 'name="state"' in client.get(url + "?whole=1").content.decode()
    part = client.get(url + "?path=/docs/3").content.decode()
    assert "lorem ipsum" in part and "&quot;id&quot;: 3" in part and "&quot;pointer&quot;" not in part
    missing = client.get(url + "?path=/docs/9")
    assert missing.status_code == 400 and "out of range" in missing.content.decode()

    fixed_doc = json.dumps({"id": 3, "text": "fixed"})
    nan = client.post(url, {"path": "/docs/3", "state": '{"id": NaN}', "reason": "x", "expected_version": 1,
                            "preview": "1"})
    assert nan.status_code == 400
    previewed = client.post(url, {"path": "/docs/3", "state": fixed_doc, "reason": "", "expected_version": 1,
                                  "preview": "1"})
    preview = previewed.content.decode()
    assert "/docs/3/text" in preview and "/pointer" not in preview
    done = client.post(url, {"path": "/docs/3", "state": fixed_doc, "reason": "garbled doc", "expected_version": 1,
                             "apply": "1", "previewed": shown_state(previewed)})
    assert done.status_code == 302
    head = Version.objects.get(session=session, number=2)
    assert version_state(head) == {"docs": [*BIG_DOCS[:3], {"id": 3, "text": "fixed"}, BIG_DOCS[4]], "pointer": "rank",
                                   "memory/notes": ["x"]}
    audit = AuditEvent.objects.get(action="version.data_fix", target_id=str(head.pk))
    assert (audit.reason, audit.details["edited"], audit.details["based_on"]) == ("garbled doc", "/docs/3", 1)


def test_a_large_state_edited_whole_comes_compact_so_its_post_fits_the_request_limit(client, staff, team, monkeypatch,
                                                                                     settings):
    """Asked for whole, a 7.6 MB state came as 19 MB of indented text, past REQUEST_MAX_BYTES: its
    preview was refused as a request too large to read, and the edit lost."""
    from snapshots_app import admin as snapshots_admin

    monkeypatch.setattr(snapshots_admin, "WHOLE_STATE_EDIT_MAX", 500)
    session = make_session(team, "many-small")
    state = {"items": [{"id": number, "tags": ["a", "b"]} for number in range(60)], "pointer": "rank"}
    url = reverse("admin:snapshots_app_version_data_fix", args=[snapshot_record(session=session, state=state).pk])
    client.force_login(staff)
    page = client.get(url + "?whole=1").content.decode()
    text = html.unescape(re.search(r'<textarea id="state" name="state"[^>]*>(.*?)</textarea>', page, re.S).group(1))
    assert orjson.loads(text) == state and "\n" not in text
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = len(text) + 300  # (the other fields: a reason, the head, ...)
    assert len(json.dumps(state, indent=2)) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE  # (what the page gave before)
    edited = text.replace('"rank"', '"ranked"')
    previewed = client.post(url, {"state": edited, "reason": "", "expected_version": 1, "preview": "1"})
    assert previewed.status_code == 200 and "/pointer" in previewed.content.decode()
    done = client.post(url, {"state": edited, "reason": "pointer typo", "expected_version": 1, "apply": "1",
                             "previewed": shown_state(previewed)})
    assert done.status_code == 302 and Version.objects.get(session=session, number=2).kind == "data_fix"


def test_the_data_fix_page_of_a_session_its_engine_may_still_write_to_says_so(client, staff, story):
    """The rewind page warned that a running engine writes its next step on top, from its memory; the
    data fix, which makes a new head as a rewind does, said nothing."""
    client.force_login(staff)
    url = reverse("admin:snapshots_app_version_data_fix", args=[Version.objects.get(session=story, number=2).pk])
    page = html.unescape(client.get(url).content.decode())
    assert 'id="engine-running"' in page and "This session is running" in page and "Stop it first" in page
    session_update(session=story, status="completed")
    assert 'id="engine-running"' not in client.get(url).content.decode()


def test_bad_json_typed_for_one_part_is_placed_where_it_was_typed(client, staff, team, monkeypatch, settings):
    """The part was parsed wrapped in {"value": ...}: every syntax error was placed 9 characters off (or,
    past the first line, at the right column of a text that never was), and a too deep part was named
    by a path under /value, which is in no state."""
    session, _, url = _big_docs(client, staff, team, monkeypatch)

    def problem(typed: str) -> str:
        response = client.post(url, {"path": "/docs/3", "state": typed, "reason": "x", "expected_version": 1,
                                     "preview": "1"})
        assert response.status_code == 400
        return html.unescape(re.search(r'<p class="errornote" role="alert">(.*?)</p>', response.content.decode(),
                                       re.S).group(1))

    assert problem('{"id": 3, "text": fixed}') == (
        "the value at /docs/3 is not valid JSON: invalid literal, expected 'false': line 1 column 19 (char 18)")
    assert problem('{\n  "id": 3,\n  "text": nope\n}').endswith("line 3 column 11 (char 23)")
    assert problem('{"id": 3, "text": "ok",}').endswith("line 1 column 23 (char 22)")
    too_deep = problem("[" * settings.STATE_MAX_DEPTH + "]" * settings.STATE_MAX_DEPTH)
    assert too_deep.startswith(f"state nests deeper than {settings.STATE_MAX_DEPTH} levels (at /docs/3/0/0/")
    assert "/value" not in too_deep
    assert Version.objects.filter(session=session).count() == 1


def test_a_data_fix_that_writes_a_key_twice_is_refused_not_half_kept(client, staff, team):
    """Pasting {"text": "fixed", ..., "text": "old"} recorded the last value and dropped the fix unseen."""
    session = make_session(team, "twice")
    base = snapshot_record(session=session, state={"docs": [{"id": 1, "text": "old"}], "pointer": "rank"})
    client.force_login(staff)
    url = reverse("admin:snapshots_app_version_data_fix", args=[base.pk])
    for path, typed, where in [
        ("", '{"docs": [{"id": 1, "text": "fixed", "text": "old"}], "pointer": "rank"}', "the state"),
        ("/docs/0", '{"id": 1,\n "text": "fixed",\n "text": "old"}', "the value at /docs/0"),
    ]:
        for step in ("preview", "apply"):
            response = client.post(url, {"path": path, "state": typed, "reason": "typo", "expected_version": 1,
                                         step: "1"})
            assert response.status_code == 400
            assert f'{where} has the key "text" twice in one object' in html.unescape(response.content.decode())
    assert Version.objects.filter(session=session).count() == 1
    fine = client.post(url, {"path": "/docs/0", "state": '{"id": 1, "text": "fixed"}', "reason": "typo",
                             "expected_version": 1, "preview": "1"})
    assert fine.status_code == 200


def test_a_large_part_of_a_large_state_is_split_again(client, staff, team, monkeypatch):
    """A part above the whole-state limit (a 15 MB list of documents, under a 16 MB state) is not put
    in the page whole either: its own parts are offered (a listed number of them, the rest by path)."""
    from snapshots_app import admin as snapshots_admin

    monkeypatch.setattr(snapshots_admin, "PARTS_SHOWN", 3)
    _, _, url = _big_docs(client, staff, team, monkeypatch)
    page = client.get(url + "?path=/docs").content.decode()
    assert 'name="state"' not in page and "lorem ipsum" not in page
    assert "?path=/docs/0" in page and "?path=/docs/2" in page and "?path=/docs/3" not in page
    assert "and 2 more" in page and "?path=/docs&amp;whole=1" in page
    whole = client.get(url + "?path=/docs&whole=1").content.decode()
    assert 'name="state"' in whole and "lorem ipsum" in whole
    one = client.get(url + "?path=/docs/3").content.decode()
    assert 'name="state"' in one and "&quot;id&quot;: 3" in one


def test_data_fix_needs_the_change_permission(client, story):
    clerk = make_user("clerk", staff=True)
    client.force_login(clerk)
    base = Version.objects.get(session=story, number=2)
    assert client.get(reverse("admin:snapshots_app_version_data_fix", args=[base.pk])).status_code == 403


def test_verify_integrity_action_records_a_problem(client, staff, story):
    client.force_login(staff)
    version = Version.objects.get(session=story, number=3)
    StateNode.objects.filter(project=story.project, digest=bytes(version.root)).update(data=b"\x00garbage")
    response = client.post(reverse("admin:snapshots_app_version_changelist"),
                           {"action": "verify_integrity", "_selected_action": [version.pk]}, follow=True)
    # Named as operators know the session: by the engine's id.
    assert f"1 of 1 failed verification: {story.external_id} v3" in response.content.decode()
    assert IntegrityProblem.objects.filter(version=version, resolved_at__isnull=True).exists()
    membership_set(project=story.project, user=staff, role=Role.VIEWER)
    timeline = client.get(reverse("snapshots:session", kwargs={"session_id": story.pk})).content.decode()
    assert 'id="integrity-problems"' in timeline and "v3</a>:" in timeline


def test_a_selection_of_large_states_is_verified_by_a_job_not_in_the_request(client, staff, story, monkeypatch):
    """50 versions of a 10 MB state were read and hashed in the request: 17 s, past a proxy's patience.
    Past VERIFY_BYTES_IN_REQUEST of state the selection goes to the workers, as a long one does."""
    from snapshots_app import admin as snapshots_admin

    picked = list(Version.objects.filter(session=story, number__in=[2, 3]))
    monkeypatch.setattr(snapshots_admin, "VERIFY_BYTES_IN_REQUEST", sum(v.logical_size for v in picked) - 1)
    client.force_login(staff)
    response = client.post(reverse("admin:snapshots_app_version_changelist"),
                           {"action": "verify_integrity", "_selected_action": [v.pk for v in picked]}, follow=True)
    assert "Verifying 2 version(s) in the background" in response.content.decode()
    assert Job.objects.get(kind="scrub").params["selected"] == 2
    monkeypatch.setattr(snapshots_admin, "VERIFY_BYTES_IN_REQUEST", sum(v.logical_size for v in picked))
    response = client.post(reverse("admin:snapshots_app_version_changelist"),
                           {"action": "verify_integrity", "_selected_action": [v.pk for v in picked]}, follow=True)
    assert "All 2 version(s) verified" in response.content.decode() and Job.objects.count() == 1


def test_verifying_integrity_in_the_admin_needs_the_operator_role(client, clerk, story):
    membership_set(project=story.project, user=clerk, role=Role.VIEWER)
    client.force_login(clerk)
    version = Version.objects.get(session=story, number=3)
    StateNode.objects.filter(project=story.project, digest=bytes(version.root)).update(data=b"\x00garbage")
    url = reverse("admin:snapshots_app_version_changelist")
    refused = client.post(url, {"action": "verify_integrity", "_selected_action": [version.pk]})
    assert refused.status_code == 403 and not IntegrityProblem.objects.exists()
    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    client.post(url, {"action": "verify_integrity", "_selected_action": [version.pk]})
    assert IntegrityProblem.objects.filter(version=version).exists()


def test_compaction_dry_run_action_reports_figures(client, staff, story):
    client.force_login(staff)
    response = client.post(reverse("admin:sessions_app_project_changelist"),
                           {"action": "compaction_preview", "_selected_action": [story.project.pk]}, follow=True)
    assert "would remove" in response.content.decode()


def test_compaction_dry_run_action_needs_the_operator_role_as_in_the_api(client, clerk, story):
    """POST /api/v1/compaction/ {dry_run: true} is for operators (viewers get 403): the admin's
    dry run, the same walk of the whole project, asks the same of staff who are not superusers."""
    membership_set(project=story.project, user=clerk, role=Role.VIEWER)
    client.force_login(clerk)
    url = reverse("admin:sessions_app_project_changelist")
    refused = client.post(url, {"action": "compaction_preview", "_selected_action": [story.project.pk]})
    assert refused.status_code == 403
    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    allowed = client.post(url, {"action": "compaction_preview", "_selected_action": [story.project.pk]}, follow=True)
    assert "would remove" in allowed.content.decode()


def test_running_compaction_now_asks_first_and_says_how_many_versions_retention_removes(client, staff, story, team):
    """Retention removes versions for good: the admin's "run now" shows, per project, how many it
    would remove and the policy in words, and queues the run only once confirmed."""
    from snapshots_app.compaction import retention_policy_set
    from snapshots_app.models import Job

    retention_policy_set(project=team, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    quiet = make_project("quiet")  # no policy: retention off
    make_session(quiet, "q-1")
    client.force_login(staff)
    changelist = reverse("admin:sessions_app_project_changelist")
    asked = client.post(changelist, {"action": "compaction_queue", "_selected_action": [team.pk, quiet.pk], "index": "0"})
    page = asked.content.decode()
    assert asked.status_code == 200 and "gone for good" in page
    assert "it would remove <strong>4 of 5 versions</strong>" in page and "(in 1 session)" in page
    assert "Keeps each session&#x27;s newest 1 version; every older version is removed." in page
    assert "retention is off: no version is removed (0 versions kept)" in page
    assert 'name="post" value="yes"' in page and f'name="_selected_action" value="{quiet.pk}"' in page
    assert not Job.objects.exists() and Version.objects.filter(session=story).count() == 5  # only asked

    done = client.post(changelist, {"action": "compaction_queue", "_selected_action": [team.pk, quiet.pk], "post": "yes"},
                       follow=True)
    assert "Queued 2 compaction job(s)" in done.content.decode()
    assert sorted(Job.objects.values_list("project__slug", "kind")) == [("acme", "compaction"), ("quiet", "compaction")]


def test_a_project_too_large_to_count_in_a_request_gets_its_policy_in_words(client, staff, story, team, monkeypatch):
    from snapshots_app import compaction

    compaction.retention_policy_set(project=team, enabled=True, keep_last=2, keep_days=7, thin_to="hour")
    monkeypatch.setattr(compaction, "RETENTION_COUNTED_MAX", 4)  # the story has 5 versions
    client.force_login(staff)
    page = client.post(reverse("admin:sessions_app_project_changelist"),
                       {"action": "compaction_queue", "_selected_action": [team.pk], "index": "0"}).content.decode()
    assert "5 versions, too many to count here (more than 4 in all)" in page and "dry run" in page
    assert ("Keeps each session&#x27;s newest 2 versions and every version younger than 7 days; "
            "older versions are thinned to one per hour (UTC).") in page
    assert "would remove" not in page


def test_data_fix_action_opens_the_editor_for_one_version(client, staff, story):
    client.force_login(staff)
    version = Version.objects.get(session=story, number=4)
    url = reverse("admin:snapshots_app_version_changelist")
    response = client.post(url, {"action": "data_fix", "_selected_action": [version.pk]})
    assert response["Location"] == reverse("admin:snapshots_app_version_data_fix", args=[version.pk])
    two = client.post(url, {"action": "data_fix", "_selected_action": [version.pk, version.pk - 1]}, follow=True)
    assert "Select exactly one version" in two.content.decode()


def test_pin_action_on_an_archived_session_says_refused_not_done(client, staff, story):
    session_archive(session=story, reason="done with it")
    client.force_login(staff)
    version = Version.objects.get(session=story, number=2)
    response = client.post(reverse("admin:snapshots_app_version_changelist"),
                           {"action": "pin", "_selected_action": [version.pk]}, follow=True)
    page = response.content.decode()
    assert "1 refused" in page and "archived" in page
    assert "Pinned 0" not in page
    version.refresh_from_db()
    assert not version.pinned


def test_pin_action_leaves_pinned_versions_as_they_are_and_says_so(client, staff, story):
    client.force_login(staff)
    changelist = reverse("admin:snapshots_app_version_changelist")
    chosen = list(Version.objects.filter(session=story, number__in=[2, 3]).values_list("pk", flat=True))
    client.post(changelist, {"action": "pin", "_selected_action": chosen[:1]})
    page = client.post(changelist, {"action": "pin", "_selected_action": chosen}, follow=True).content.decode()
    assert "Pinned 1 version(s). 1 were pinned already: left as they were." in page
    assert AuditEvent.objects.filter(action="version.pin").count() == 2


def test_session_list_shows_each_projects_recently_updated_first(client, staff, story, team):
    quiet = make_session(team, "run-quiet")
    client.force_login(staff)
    page = client.get(reverse("admin:sessions_app_workflowsession_changelist")).content.decode()
    # run-quiet was made after story's last write
    assert page.index(quiet.external_id) < page.index(story.external_id)
    story.refresh_from_db()
    snapshot_record(session=story, state={"n": 99})
    page = client.get(reverse("admin:sessions_app_workflowsession_changelist")).content.decode()
    assert page.index(story.external_id) < page.index(quiet.external_id)


@pytest.fixture
def clerk(db):
    """Staff with every model permission, but a member of one project only."""
    user = make_user("clerk", staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label__in=["sessions_app", "snapshots_app"]))
    return user


def test_staff_who_are_not_superusers_reach_only_their_projects(client, clerk, story):
    other = make_project("globex")
    secret = make_session(other, "globex-run")
    snapshot_record(session=secret, state={"token": "globex-secret"})
    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    client.force_login(clerk)

    for model in ("sessions_app/workflowsession", "snapshots_app/version", "sessions_app/auditevent",
                  "sessions_app/project", "sessions_app/apikey", "sessions_app/membership"):
        page = client.get(f"/admin/{model}/").content.decode()
        assert "globex" not in page.lower(), model  # rows, and the "By project" filter
    assert "run-42" in client.get("/admin/sessions_app/workflowsession/").content.decode()
    foreign = Version.objects.get(session=secret)
    assert client.get(reverse("admin:snapshots_app_version_data_fix", args=[foreign.pk])).status_code == 404
    assert client.get(reverse("admin:snapshots_app_version_change", args=[foreign.pk])).status_code == 302

    # An operator fixes data in their project, but keys and members need the admin role there.
    own = Version.objects.get(session=story, number=2)
    assert client.get(reverse("admin:snapshots_app_version_data_fix", args=[own.pk])).status_code == 200
    for project in (story.project, other):
        response = client.post(reverse("admin:sessions_app_apikey_add"),
                               {"project": project.pk, "name": "sneaky", "scopes": ["admin"]})
        assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    assert not ApiKey.objects.filter(name="sneaky").exists()
    response = client.post(reverse("admin:sessions_app_project_changelist"),
                           {"action": "compaction_queue", "_selected_action": [story.project.pk]})
    assert response.status_code == 403 and "needs the admin role in acme" in response.content.decode()
    # An export or a scrub the operator role starts, as over the API (the admin refused them).
    for action in ("export_queue", "export_healthy_queue", "scrub_queue"):
        response = client.post(reverse("admin:sessions_app_project_changelist"),
                               {"action": action, "_selected_action": [story.project.pk]}, follow=True)
        assert response.status_code == 200 and "Queued 1" in response.content.decode(), action
    assert sorted(Job.objects.filter(project=story.project).values_list("kind", flat=True)) == ["export", "export", "scrub"]
    ApiKey.objects.create(project=story.project, name="engine-key", prefix="p1", key_hash="x", scopes=["write"])
    assert "engine-key" not in client.get("/admin/sessions_app/apikey/").content.decode()  # keys: admins only
    membership_set(project=story.project, user=clerk, role=Role.ADMIN)
    assert "engine-key" in client.get("/admin/sessions_app/apikey/").content.decode()
    response = client.post(reverse("admin:sessions_app_apikey_add"),
                           {"project": story.project.pk, "name": "ops", "scopes": ["read"]})
    assert response.status_code == 302 and ApiKey.objects.filter(name="ops", project=story.project).exists()


def test_membership_changes_project_creation_and_user_deletion_are_audited(client, staff, team, operator):
    client.force_login(staff)
    client.post(reverse("admin:sessions_app_project_add"), {"name": "Initech", "slug": "initech"})
    created = AuditEvent.objects.get(action="project.create", details__slug="initech")
    assert (created.actor_label, created.details["admin"]) == ("root", "root")
    membership_set(project=team, user=make_user("ada"), role=Role.ADMIN)  # (olga, made an admin, is not the last)
    membership = Membership.objects.get(project=team, user=operator)
    client.post(reverse("admin:sessions_app_membership_change", args=[membership.pk]), {"role": "admin"})
    change = AuditEvent.objects.get(action="membership.set", details__previous="operator")
    assert (change.actor_label, change.details["role"], change.details["user"]) == ("root", "admin", "olga")
    response = client.post(reverse("admin:auth_user_delete", args=[operator.pk]), {"post": "yes"})
    assert response.status_code == 302 and not User.objects.filter(pk=operator.pk).exists()
    removal = AuditEvent.objects.get(action="membership.remove", project=team)
    assert (removal.actor_label, removal.reason) == ("root", "the user account was deleted")
    assert removal.details == {"user": "olga", "role": "admin"}
    # An account deleted outside the admin (a script) is audited too, without an actor to name.
    scripted = User.objects.create_user("sam")
    membership_set(project=team, user=scripted, role=Role.VIEWER)
    scripted.delete()
    removal = AuditEvent.objects.get(action="membership.remove", project=team, details__user="sam")
    assert (removal.actor_label, removal.reason[:29]) == ("system", "the user account was deleted ")


def test_staff_cannot_leave_a_project_without_an_admin_by_demoting_removing_or_deleting_its_last(
    client, staff, team, operator, viewer
):
    """Demoting a project's last admin, removing their membership (alone or in a selection) or deleting
    their account left nobody to manage its members and keys. Each is refused with a message naming
    the project, and nothing is stored: no change, no audit event, no entry in Django's history."""
    from django.contrib.admin.models import LogEntry

    membership_set(project=team, user=operator, role=Role.ADMIN)
    ada = make_user("ada")
    membership_set(project=team, user=ada, role=Role.ADMIN)
    ada.is_active = False  # an admin who cannot sign in does not count
    ada.save()
    olga = Membership.objects.get(project=team, user=operator)
    audited = AuditEvent.objects.count()
    refusal = "would leave the project acme with no admin who can sign in"
    client.force_login(staff)

    demoted = client.post(reverse("admin:sessions_app_membership_change", args=[olga.pk]), {"role": "operator"})
    assert demoted.status_code == 200 and "errornote" in demoted.content.decode()
    assert f"Making olga an operator instead of an admin {refusal}" in html.unescape(demoted.content.decode())

    change_page = reverse("admin:sessions_app_membership_change", args=[olga.pk])
    delete = reverse("admin:sessions_app_membership_delete", args=[olga.pk])
    for ask in (client.get, lambda url: client.post(url, {"post": "yes"})):  # refused before the confirmation too
        asked = ask(delete)
        assert asked.status_code == 302 and asked.url == change_page
        assert f"Removing olga {refusal}" in html.unescape(client.get(asked.url).content.decode())
    changelist = reverse("admin:sessions_app_membership_changelist")
    viewers = Membership.objects.get(project=team, user=viewer)
    for confirmed in ({}, {"post": "yes"}):
        bulk = client.post(changelist, {"action": "delete_selected", "_selected_action": [olga.pk, viewers.pk],
                                        **confirmed}, follow=True)
        assert f"Removing these members {refusal}" in html.unescape(bulk.content.decode())

    user_change = reverse("admin:auth_user_change", args=[operator.pk])
    user_delete = reverse("admin:auth_user_delete", args=[operator.pk])
    for ask in (client.get, lambda url: client.post(url, {"post": "yes"})):
        asked = ask(user_delete)
        assert asked.status_code == 302 and asked.url == user_change
        assert f"Deleting the account olga {refusal}" in html.unescape(client.get(asked.url).content.decode())
    bulk = client.post(reverse("admin:auth_user_changelist"),
                       {"action": "delete_selected", "_selected_action": [operator.pk, viewer.pk], "post": "yes"},
                       follow=True)
    assert f"Deleting these accounts {refusal}" in html.unescape(bulk.content.decode())

    assert Membership.objects.filter(project=team).count() == 3 and User.objects.filter(pk=viewer.pk).exists()
    olga.refresh_from_db()
    assert olga.role == Role.ADMIN and User.objects.filter(pk=operator.pk).exists()
    assert AuditEvent.objects.count() == audited and not LogEntry.objects.exists()

    # With another admin who can sign in, each goes through (and is audited) as before.
    ada.is_active = True
    ada.save()
    assert client.post(reverse("admin:sessions_app_membership_change", args=[olga.pk]), {"role": "operator"}
                       ).status_code == 302
    olga.refresh_from_db()
    assert olga.role == Role.OPERATOR
    assert AuditEvent.objects.filter(action="membership.set", details__previous="admin", actor=staff).count() == 1


def test_an_integrity_problem_is_resolved_in_the_admin_after_the_data_is_restored(client, staff, story):
    version = Version.objects.get(session=story, number=5)
    node = StateNode.objects.filter(project=story.project, digest=bytes(version.root))
    original = bytes(node.get().data)
    node.update(data=b"\x00garbage")
    problem = integrity_problem_record(version=version, detail="checksum mismatch")
    client.force_login(staff)
    listing = client.get(reverse("admin:snapshots_app_integrityproblem_changelist")).content.decode()
    url = reverse("admin:snapshots_app_integrityproblem_resolve", args=[problem.pk])
    assert url in listing
    refused = client.post(url, {"resolution": "looked fine to me"})
    assert refused.status_code == 400 and "still fails verification" in refused.content.decode()
    node.update(data=original)
    assert client.post(url, {"resolution": "restored from backup"}).status_code == 302
    problem.refresh_from_db()
    assert problem.resolved_at is not None and AuditEvent.objects.filter(action="integrity.resolve").exists()


def test_resolving_needs_the_change_permission_and_a_damaged_base_cannot_start_a_data_fix(client, staff, story):
    version = Version.objects.get(session=story, number=3)  # not the head: no cache holds its state
    StateNode.objects.filter(project=story.project, digest=bytes(version.root)).update(data=b"\x00garbage")
    problem = integrity_problem_record(version=version, detail="checksum mismatch")
    clerk = make_user("clerk", staff=True)
    clerk.user_permissions.set(Permission.objects.filter(codename="view_integrityproblem"))
    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    client.force_login(clerk)
    url = reverse("admin:snapshots_app_integrityproblem_resolve", args=[problem.pk])
    assert client.get(url).status_code == 403
    assert client.post(url, {"resolution": "fine"}).status_code == 403

    client.force_login(staff)
    clear_cache()  # a fresh process: nothing remembers the state from before the damage
    response = client.get(reverse("admin:snapshots_app_version_data_fix", args=[version.pk]), follow=True)
    assert response.status_code == 200 and "Start the data fix from another version" in response.content.decode()


def test_a_new_keys_secret_never_travels_in_a_cookie(client, staff, team):
    """The "copy this key now" message is kept in the server-side session, not a messages cookie."""
    client.force_login(staff)
    response = client.post(reverse("admin:sessions_app_apikey_add"), {"project": team.pk, "name": "ci", "scopes": ["read"]})
    assert response.status_code == 302
    assert "messages" not in response.cookies
    page = client.get(response["Location"]).content.decode()
    assert "it is not shown again: sr_" in page


def test_history_lists_never_count_or_scan_a_whole_table(client, staff, story, monkeypatch):
    """Audit events, versions, sessions and jobs only grow: their admin lists stop counting at the
    cap (and say "more than"), and the audit log's filters list no DISTINCT values of the table."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from sessions_app.admin import CappedCountPaginator

    monkeypatch.setattr(CappedCountPaginator, "cap", 3)
    session_archive(session=story, reason="one")  # audit events beyond the story's own
    client.force_login(staff)
    assert AuditEvent.objects.count() > 3 and Version.objects.filter(session=story).count() > 3
    with CaptureQueriesContext(connection) as queries:
        audit = client.get("/admin/sessions_app/auditevent/").content.decode()
    assert "more than 3 audit events" in audit and "Session archived" in audit
    sql = " ".join(query["sql"] for query in queries.captured_queries).upper()
    assert "DISTINCT" not in sql and "DATE_TRUNC" not in sql and "MIN(" not in sql
    assert "LIMIT 4" in sql  # the count stops at cap + 1
    filtered = client.get("/admin/snapshots_app/version/?kind__exact=step").content.decode()
    assert "more than 3 results" in filtered and "more than 3 versions" in filtered
    few = client.get(f"/admin/snapshots_app/version/?q={story.external_id}&kind__exact=rewind").content.decode()
    assert "more than" not in few


def test_a_pasted_session_id_finds_the_session_and_its_versions_in_the_project_reached(client, clerk, story):
    """The id in a session page's address (or an API answer) is what an operator has at hand: the
    sessions and versions lists searched only external ids and workflows, so it found nothing. Another
    project's session, pasted by staff who do not reach it, still finds nothing."""
    other = make_session(make_project("globex"), "globex-run")
    snapshot_record(session=other, state={"token": "globex-secret"})
    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    client.force_login(clerk)
    sessions = client.get("/admin/sessions_app/workflowsession/", {"q": f" {story.pk} "}).content.decode()
    assert "run-42" in sessions and "1 result" in sessions
    versions = client.get("/admin/snapshots_app/version/", {"q": str(story.pk).upper()}).content.decode()
    assert "5 results" in versions and "run-42 v5" in versions
    for model in ("sessions_app/workflowsession", "snapshots_app/version"):
        page = client.get(f"/admin/{model}/", {"q": str(other.pk)}).content.decode()
        assert "globex-run" not in page and "0 results" in page, model
    assert "run-42" in client.get("/admin/sessions_app/workflowsession/", {"q": "run-4"}).content.decode()


def test_a_pasted_session_id_finds_its_versions_through_the_session_indexes(client, staff, story):
    """The versions list finds a pasted session id among the sessions first (pk and external id indexes),
    then their versions by (session, number): as an OR across the join (the external id or the version's
    session_id) PostgreSQL joined every version to every session, for the page and for its count."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.conftest import query_plan

    other = make_session(story.project, "run-43")
    snapshot_record(session=other, state={"n": 1})
    client.force_login(staff)
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/admin/snapshots_app/version/", {"q": f" {str(story.pk).upper()} "}).content.decode()
    assert "5 results" in page and "run-42 v5" in page and "run-43" not in page
    listing = [q["sql"] for q in queries.captured_queries if 'FROM "snapshots_app_version"' in q["sql"]]
    assert len(listing) == 2  # the page and its (capped) count
    for sql in listing:
        plan = query_plan(sql)
        assert "version_unique_number" in plan and "Index Cond: (session_id = " in plan, plan


def test_a_versions_search_reads_a_page_of_the_sessions_it_finds_without_sorting_them_all(client, staff, story,
                                                                                           monkeypatch):
    """A search finds sessions, then lists their versions as version_unique_number holds them (each
    session's newest first): a page of a long session is read, where ordered by id every version of it was
    read and sorted (322 ms for a session of 200,000 versions, growing with it), page after page."""
    from django.test.utils import CaptureQueriesContext

    from snapshots_app import admin as snapshots_admin
    from tests.conftest import query_plan

    other = make_session(story.project, "run-43")
    snapshot_record(session=other, state={"n": 1})
    snapshot_record(session=make_session(story.project, "nightly"), state={"n": 1})
    client.force_login(staff)
    url = "/admin/snapshots_app/version/"
    for term in ("run-42", "RUN-4 2", f"{story.pk}", '"un-42"'):
        with CaptureQueriesContext(connection) as queries:
            page = client.get(url, {"q": term}).content.decode()
        shown = re.findall(r">(run-4\d v\d+)<", page)
        assert shown == [f"run-42 v{n}" for n in range(5, 0, -1)], (term, shown)
        listing = [q["sql"] for q in queries.captured_queries if 'FROM "snapshots_app_version"' in q["sql"]]
        assert len(listing) == 2  # the page and its (capped) count
        for sql in listing:
            plan = query_plan(sql, priced_out=("seqscan", "sort"))
            assert "version_unique_number" in plan and "Sort" not in plan, plan
    page = client.get(url, {"q": "run-4"}).content.decode()
    assert re.findall(r">(run-4\d) v\d+<", page).count("run-42") == 5 and "run-43 v1" in page
    for unclosed in ('"', "'run-42"):  # a quote not closed is searched as it is, as Django does
        assert client.get(url, {"q": unclosed}).status_code == 200
    # A search naming more sessions than it lists by id still finds each of their versions.
    monkeypatch.setattr(snapshots_admin, "SEARCH_SESSIONS_BY_ID", 1)
    page = client.get(url, {"q": "run-4"}).content.decode()
    assert re.findall(r">(run-4\d) v\d+<", page).count("run-42") == 5 and "run-43 v1" in page
    assert ">nightly v1<" not in page and ">nightly v1<" in client.get(url).content.decode()


def test_the_audit_log_finds_a_sessions_events_by_its_id_through_the_indexes(client, staff, story):
    """A pasted session id finds the events about it (and the fork that made it) by the session_id and
    target_id indexes: as a substring of four text columns it read the whole log, twice (page, count)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from snapshots_app.services import snapshot_fork

    fork = snapshot_fork(session=story, from_version=2, reason="try again")
    session_archive(session=fork, reason="done with it")
    session_archive(session=story, reason="elsewhere")
    client.force_login(staff)
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/admin/sessions_app/auditevent/", {"q": f" {str(fork.pk).upper()} "}).content.decode()
    assert "done with it" in page and "try again" in page and "elsewhere" not in page
    sql = " ".join(q["sql"] for q in queries.captured_queries if "sessions_app_auditevent" in q["sql"]).upper()
    assert "LIKE" not in sql
    assert "elsewhere" in client.get("/admin/sessions_app/auditevent/", {"q": "elsewh"}).content.decode()


def test_the_audit_log_finds_a_sessions_events_by_its_name_and_names_it(client, staff, story):
    """Searching the name an operator knows a session by ("run-42") found none of its rewinds, and each
    row named its session only by a UUID."""
    from sessions_app.services import session_delete
    from snapshots_app.services import snapshot_rewind
    from tests.factories import make_session

    snapshot_rewind(session=story, to_version=2, reason="bad step")
    session_archive(session=story, reason="elsewhere")
    other = make_session(story.project, "other-run")
    session_archive(session=other, reason="not this one")
    gone = make_session(story.project, "run-gone")
    session_delete(session=gone, reason="done with it")
    client.force_login(staff)
    page = client.get("/admin/sessions_app/auditevent/", {"q": "run-"}).content.decode()
    assert "bad step" in page and "elsewhere" in page and "done with it" in page and "not this one" not in page
    assert page.count('<td class="field-session_name">run-42</td>') == 2
    assert '<td class="field-session_name">run-gone</td>' in page  # as its deletion recorded it


def test_an_audit_search_matching_more_session_names_than_it_reads_says_so(client, staff, story, monkeypatch):
    """Past NAMED_SESSIONS_SEARCHED sessions so named, the log listed the events of an arbitrary 500 of
    them as if they were all: it now lists those of the most recently active and says so."""
    from sessions_app import admin as sessions_admin

    monkeypatch.setattr(sessions_admin, "NAMED_SESSIONS_SEARCHED", 2)
    for number in range(3):
        session_update(session=make_session(story.project, f"bulk-{number}"), tags=["checked"])  # (names no session)
    client.force_login(staff)
    page = html.unescape(client.get("/admin/sessions_app/auditevent/", {"q": "bulk-"}).content.decode())
    assert "More than 2 sessions have “bulk-” in their name" in page
    listed = re.findall(r'<td class="field-session_name">(bulk-\d)</td>', page)
    assert sorted(listed) == ["bulk-1", "bulk-2"]
    page = html.unescape(client.get("/admin/sessions_app/auditevent/", {"q": "bulk-0"}).content.decode())
    assert "More than" not in page and re.findall(r'<td class="field-session_name">(bulk-\d)</td>', page) == ["bulk-0"]


def _many_old_pins(project, count: int = 3000) -> None:
    """A log as it grows: thousands of routine events, the oldest a month old (the planner is told)."""
    AuditEvent.objects.bulk_create([AuditEvent(project=project, action="version.pin", target_type="version",
                                               target_id=str(n), actor_label="engine") for n in range(count)])
    AuditEvent.objects.filter(action="version.pin").update(created_at=timezone.now() - timedelta(days=30))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sessions_app_auditevent")


def test_the_audit_log_filtered_to_a_rare_action_or_a_day_reads_only_those_events(client, staff, team, operator):
    """A filter matching few events among many (a membership change among a month of pins, the events of
    today) reads them by audit_action or audit_created. The list walked the whole log by id looking for
    them, for the page and again for its count: 150 ms each at 1,000,000 events, growing with the log."""
    from django.test.utils import CaptureQueriesContext

    from sessions_app.services import membership_set
    from tests.conftest import query_plan

    _many_old_pins(team)
    membership_set(project=team, user=operator, role=Role.ADMIN, actor_label="root")
    client.force_login(staff)
    today = timezone.now().astimezone(UTC).date()
    # The team's project and members, olga's new role: a few events of today among the month of pins.
    changes, today_events = (AuditEvent.objects.filter(action="membership.set").count(),
                             AuditEvent.objects.exclude(action="version.pin").count())
    assert 0 < changes < today_events < 10
    for params, recent, index in (
        ({"action__exact": "membership.set"}, changes, "audit_action"),
        ({"created_at__gte": f"{today} 00:00:00+00:00", "created_at__lt": f"{today + timedelta(days=1)} 00:00:00+00:00"},
         today_events, "audit_created"),
    ):
        with CaptureQueriesContext(connection) as queries:
            page = client.get("/admin/sessions_app/auditevent/", params).content.decode()
        assert f"{recent} result" in page and ">engine<" not in page, params
        listing = [q["sql"] for q in queries.captured_queries if 'FROM "sessions_app_auditevent"' in q["sql"]]
        assert len(listing) == 2  # the page and its (capped) count
        for sql in listing:
            plan = query_plan(sql)
            assert index in plan and "sessions_app_auditevent_pkey" not in plan, plan


def test_the_jobs_list_pages_by_the_primary_key(client, staff, team):
    """Jobs only grow (each project's hourly scrub, daily compaction): the list walks the primary key
    index; ordered by created_at, which has no index of its own, every view sorted the whole table."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from snapshots_app.models import Job

    Job.objects.bulk_create([Job(project=team, kind="scrub", status="done") for _ in range(3)])
    client.force_login(staff)
    with CaptureQueriesContext(connection) as queries:
        assert client.get("/admin/snapshots_app/job/").status_code == 200
    listing = [q["sql"] for q in queries.captured_queries if 'FROM "snapshots_app_job"' in q["sql"]]
    orders = [sql.split(" ORDER BY ", 1)[1] for sql in listing]
    assert len(orders) == 2 and all(order.startswith('"snapshots_app_job"."id" DESC') for order in orders), orders


def test_a_jobs_admin_page_keeps_the_servers_file_system_to_itself(client, clerk, team, settings, tmp_path):
    """As in the API, a finished export names its file, not where the server keeps it."""
    from snapshots_app.models import Job

    settings.VAR_DIR = tmp_path
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "acme-7.ndjson").write_bytes(b"{}\n")
    membership_set(project=team, user=clerk, role=Role.VIEWER)
    job = Job.objects.create(project=team, kind="export", status="done",
                             result={"file": "acme-7.ndjson", "path": "/srv/exports/acme-7.ndjson", "sessions": 3})
    client.force_login(clerk)
    page = client.get(reverse("admin:snapshots_app_job_change", args=[job.pk])).content.decode()
    assert "acme-7.ndjson" in page and "&quot;sessions&quot;: 3" in page
    assert "/srv/exports" not in page
    assert f'<a href="/api/v1/jobs/{job.pk}/file/">Download acme-7.ndjson</a>' in page  # it had no link
    (tmp_path / "exports" / "acme-7.ndjson").unlink()  # swept, or its session deleted: no dead link
    page = client.get(reverse("admin:snapshots_app_job_change", args=[job.pk])).content.decode()
    assert "Download" not in page and "The export file is no longer there; export again." in page


def test_a_large_compactions_admin_page_shows_its_totals_first_and_removed_versions_as_ranges(client, clerk, team):
    """10,485 removed version numbers were pretty-printed a line each (a page 149,000 px tall), above the totals."""
    from snapshots_app.models import Job

    membership_set(project=team, user=clerk, role=Role.VIEWER)
    removed = [*range(1, 5001), *range(5003, 10488)]
    job = Job.objects.create(project=team, kind="compaction", status="done",
                             result={"removed_numbers": {"0b5d": removed}, "versions_removed": len(removed)})
    client.force_login(clerk)
    page = client.get(reverse("admin:snapshots_app_job_change", args=[job.pk])).content.decode()
    assert "&quot;0b5d&quot;: &quot;v1\u2013v5000, v5003\u2013v10487&quot;" in page
    assert page.index("versions_removed") < page.index("removed_numbers") and "\n  5001" not in page


def test_the_project_pickers_offer_only_projects_where_the_user_may_add_keys_and_members(client, clerk, team):
    """A staff user who is an admin of one project and a viewer of another is not offered the
    other one by the autocomplete of a new key's or member's project (the form would refuse it)."""
    watched = make_project("globex")
    membership_set(project=team, user=clerk, role=Role.ADMIN)
    membership_set(project=watched, user=clerk, role=Role.VIEWER)
    client.force_login(clerk)
    for model in ("apikey", "membership"):
        response = client.get(reverse("admin:autocomplete"), {"app_label": "sessions_app", "model_name": model,
                                                               "field_name": "project", "term": ""})
        assert [row["text"] for row in response.json()["results"]] == ["Acme"], model
    assert "Globex" in client.get("/admin/sessions_app/project/").content.decode()  # still listed: a viewer reads


def test_a_project_admin_who_is_not_a_superuser_adds_a_member_by_username(client, clerk, team):
    """The member form asked for a raw user id, whose lookup popup (every user of the install)
    answers 403 to anyone but superusers: project admins had to know ids. It takes a username."""
    newcomer = make_user("nadia")
    membership_set(project=team, user=clerk, role=Role.ADMIN)
    client.force_login(clerk)
    add = reverse("admin:sessions_app_membership_add")
    page = client.get(add).content.decode()
    assert 'name="user"' in page and "related-lookup" not in page
    refused = client.post(add, {"project": team.pk, "user": "nobody", "role": "viewer"})
    assert refused.status_code == 200 and "No active user has that username." in refused.content.decode()
    assert client.post(add, {"project": team.pk, "user": "nadia", "role": "operator"}).status_code == 302
    added = Membership.objects.get(project=team, user=newcomer)
    assert added.role == Role.OPERATOR
    assert AuditEvent.objects.filter(action="membership.set", project=team, details__user="nadia",
                                     actor=clerk).exists()
    # Its role changes later on the same page, the user no longer editable.
    changed = client.post(reverse("admin:sessions_app_membership_change", args=[added.pk]), {"role": "viewer"})
    assert changed.status_code == 302
    added.refresh_from_db()
    assert added.role == Role.VIEWER


def test_deactivating_and_reactivating_an_account_in_the_admin_is_audited_in_its_projects(
    client, staff, team, operator
):
    """A deactivated account signs in nowhere: as good as removed from its projects, yet their audit
    logs said nothing of it (a deletion is recorded). Now each project records who did it."""
    client.force_login(staff)
    url = reverse("admin:auth_user_change", args=[operator.pk])
    joined = timezone.localtime(operator.date_joined)
    form = {"username": "olga", "date_joined_0": joined.strftime("%Y-%m-%d"), "date_joined_1": joined.strftime("%H:%M:%S")}
    assert client.post(url, form).status_code == 302  # is_active left unticked
    operator.refresh_from_db()
    assert not operator.is_active
    event = AuditEvent.objects.get(action="user.deactivate", project=team)
    assert (event.actor_label, event.details) == ("root", {"user": "olga", "role": "operator"})
    assert client.post(url, {**form, "is_active": "on"}).status_code == 302
    assert AuditEvent.objects.filter(action="user.reactivate", project=team, actor=staff).count() == 1
    assert client.post(url, {**form, "is_active": "on", "first_name": "Olga"}).status_code == 302
    assert AuditEvent.objects.filter(action__startswith="user.", project=team).count() == 2  # only the changes


def test_a_key_made_in_the_admin_is_offered_the_default_expiry_and_keeps_the_one_chosen(client, staff, team, settings):
    settings.API_KEY_DEFAULT_LIFETIME_DAYS = 30
    client.force_login(staff)
    add = reverse("admin:sessions_app_apikey_add")
    offered = (timezone.now() + timedelta(days=30)).strftime("%Y-%m-%d")
    assert f'name="expires_at_0" value="{offered}"' in client.get(add).content.decode()

    response = client.post(add, {"project": team.pk, "name": "ci", "scopes": ["write"],
                                 "expires_at_0": "2099-01-31", "expires_at_1": "12:00:00"})
    assert response.status_code == 302
    assert ApiKey.objects.get(name="ci").expires_at == datetime(2099, 1, 31, 12, tzinfo=UTC)
    client.post(add, {"project": team.pk, "name": "forever", "scopes": ["write"], "expires_at_0": "", "expires_at_1": ""})
    assert ApiKey.objects.get(name="forever").expires_at is None  # emptied: the creator's choice, not the default

    response = client.post(add, {"project": team.pk, "name": "stale", "scopes": ["write"],
                                 "expires_at_0": "2001-01-31", "expires_at_1": "12:00:00"})
    assert response.status_code == 200 and "expires_at must be in the future" in response.content.decode()
    assert not ApiKey.objects.filter(name="stale").exists()


def test_the_key_list_shows_expiry_and_creators_who_left_and_an_admin_extends_a_key(client, staff, team, operator):
    erin = make_user("erin")
    membership_set(project=team, user=erin, role=Role.ADMIN)
    left, _ = api_key_create(project=team, name="erins-engine", scopes=["write"], actor=erin,
                             expires_at=timezone.now() + timedelta(days=3))
    api_key_create(project=team, name="roots-engine", scopes=["write"], actor=staff)
    erin.is_active = False
    erin.save()

    client.force_login(staff)
    changelist = reverse("admin:sessions_app_apikey_changelist")
    page = client.get(changelist).content.decode()
    assert "Account deactivated" in page and "Still an admin" in page and "Expiring within 14 days" in page
    assert "erin (deactivated)" in page and "write</td>" in page  # made by, and the scopes as words
    deactivated = client.get(changelist, {"creator": "deactivated"}).content.decode()
    assert "erins-engine" in deactivated and "roots-engine" not in deactivated
    expiring = client.get(changelist, {"status": "expiring"}).content.decode()
    assert "erins-engine" in expiring and "roots-engine" not in expiring

    url = reverse("admin:sessions_app_apikey_change", args=[left.pk])
    assert client.post(url, {"expires_at_0": "2098-06-30", "expires_at_1": "00:00:00"}).status_code == 302
    left.refresh_from_db()
    assert left.expires_at == datetime(2098, 6, 30, tzinfo=UTC)
    event = AuditEvent.objects.get(action="api_key.expiry")
    assert event.actor == staff and event.details["to"] == "2098-06-30T00:00:00+00:00"
    assert client.post(url, {"expires_at_0": "2001-06-30", "expires_at_1": "00:00:00"}).status_code == 200
    left.refresh_from_db()
    assert left.expires_at.year == 2098

    api_key_revoke(api_key=left)
    page = client.get(url).content.decode()
    assert 'name="_save"' not in page and "Revoked" in page
    assert client.post(url, {"expires_at_0": "2099-06-30", "expires_at_1": "00:00:00"}).status_code == 403
    assert AuditEvent.objects.filter(action="api_key.expiry").count() == 1


def test_deactivating_or_demoting_a_key_maker_names_the_keys_that_still_work(client, staff, team, operator):
    """Their keys are not revoked (an engine may depend on one), but the admin who acted is told."""
    membership_set(project=team, user=make_user("ada"), role=Role.ADMIN)  # (olga is not its last admin)
    membership_set(project=team, user=operator, role=Role.ADMIN)
    api_key_create(project=team, name="olgas-engine", scopes=["write"], actor=operator)
    client.force_login(staff)
    membership = Membership.objects.get(project=team, user=operator)
    response = client.post(reverse("admin:sessions_app_membership_change", args=[membership.pk]), {"role": "operator"},
                           follow=True)
    page = response.content.decode()
    assert "Olga made API keys that still work (acme: olgas-engine)" in page and "creator=not_admin" in page

    joined = timezone.localtime(operator.date_joined)
    form = {"username": "olga", "date_joined_0": joined.strftime("%Y-%m-%d"), "date_joined_1": joined.strftime("%H:%M:%S")}
    page = client.post(reverse("admin:auth_user_change", args=[operator.pk]), form, follow=True).content.decode()
    assert "Olga made API keys that still work" in page and "creator=deactivated" in page
    assert ApiKey.objects.get(name="olgas-engine").revoked_at is None

    # Deleted: "review them" lists her keys, not every key without an account (a command's, here).
    api_key_create(project=team, name="cron-engine", scopes=["write"], actor_label="manage.py create_api_key")
    page = client.post(reverse("admin:auth_user_delete", args=[operator.pk]), {"post": "yes"}, follow=True).content.decode()
    review = html.unescape(re.search(r'<a href="([^"]+)">review them</a>', page).group(1))
    assert "creator=no_account" in review
    listed = client.get(review).content.decode()
    assert "olgas-engine" in listed and "cron-engine" not in listed


def test_pinning_a_select_all_pins_and_audits_each_version_in_queries_that_do_not_grow_with_it(client, staff, story):
    """A select-all of thousands of versions is pinned in a few statements per batch (one by one, each
    version's lock, update and audit row made a request of minutes), with the same outcome as one
    by one: every version pinned and audited, an archived session's versions refused and named."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    archived = make_session(story.project, "run-archived")
    record_history(archived, 3)
    session_archive(session=archived, reason="kept as it is")
    url = reverse("admin:snapshots_app_version_changelist")
    client.force_login(staff)

    def act(action: str, query: dict, selected: list[int] | None = None) -> tuple[str, int]:
        chosen = {"_selected_action": selected} if selected else {"select_across": "1", "_selected_action": ["0"]}
        with CaptureQueriesContext(connection) as queries:
            page = client.post(f"{url}?{urlencode(query)}", {"action": action, "index": "0", **chosen}, follow=True)
        return page.content.decode(), len(queries)

    two = list(Version.objects.filter(session=story, number__lte=2).values_list("pk", flat=True))
    few, few_queries = act("pin", {}, two)
    assert "Pinned 2 version(s)." in few
    more = make_session(story.project, "run-43")
    record_history(more, 40)
    page, queries = act("pin", {})
    assert "Pinned 43 version(s). 2 were pinned already: left as they were." in page
    assert "3 refused: session run-archived is archived" in page
    assert queries <= few_queries + 5  # (the page shows more rows: not a query per version)
    pinned = Version.objects.filter(pinned=True)
    assert set(pinned.values_list("session_id", flat=True)) == {story.pk, more.pk} and pinned.count() == 45
    events = AuditEvent.objects.filter(action="version.pin")
    assert events.count() == 45  # the two pinned first are not pinned (nor audited) again, as one by one
    assert {(event.target_id, event.details["version"], event.session_id, event.actor_label) for event in events
            if event.session_id == more.pk} == {(str(v.pk), v.number, more.pk, "root") for v in more.versions.all()}
    assert not Version.objects.filter(session=archived, pinned=True).exists()

    page, _ = act("unpin", {"q": "run-43"})
    assert "Unpinned 40 version(s)." in page and "refused" not in page
    assert Version.objects.filter(pinned=True).count() == 5
    assert AuditEvent.objects.filter(action="version.unpin", session_id=more.pk).count() == 40


def test_free_text_audit_search_finds_by_any_searched_column_through_trigram_indexes(client, staff, story):
    """A word of a reason, an actor or part of an id finds its events, case aside, and every searched
    column has an index that serves the substring (with one column unindexed the whole log is read:
    1.65 s at 300,000 events, page and count each)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from sessions_app.services import audit_record
    from tests.conftest import query_plan

    audit_record(project=story.project, action="session.update", target_type="session", target_id=story.pk,
                 session_id=story.pk, reason="Customer asked to undo the REFUND step", actor_label="billing-engine")
    audit_record(project=story.project, action="version.pin", target_type="version", target_id=987654,
                 session_id=story.pk, actor_label="olga")
    client.force_login(staff)
    url = "/admin/sessions_app/auditevent/"

    def found(term: str) -> set[str]:
        page = client.get(url, {"q": term}).content.decode()
        return {label for label in ("billing-engine", "olga") if f">{label}<" in page}

    assert found("refund") == {"billing-engine"} and found("undo the") == {"billing-engine"}
    assert found("OLG") == {"olga"} and found("87654") == {"olga"} and found("no such words") == set()
    assert found(str(story.pk)[4:13]) == {"billing-engine", "olga"}  # part of the session's id
    with CaptureQueriesContext(connection) as queries:
        client.get(url, {"q": "refund step"})
    searches = [q["sql"] for q in queries.captured_queries if "sessions_app_auditevent" in q["sql"] and "LIKE" in q["sql"]]
    assert len(searches) == 2  # the page and its (capped) count
    for sql in searches:
        # Bitmap scans only: a walk of the primary key, filtering every event, is priced out too.
        plan = query_plan(sql, priced_out=("seqscan", "indexscan", "indexonlyscan"))
        assert "Seq Scan" not in plan, plan
        for index in ("audit_target_id_trgm", "audit_actor_label_trgm", "audit_reason_trgm", "audit_session_id_trgm"):
            assert index in plan, plan


def test_a_projects_jobs_are_listed_newest_first_by_their_index(client, staff, team):
    """Filtered to a project, the jobs list reads that project's newest jobs from job_project_created
    (not the whole table walked by id, which for a project with few jobs among many read them all)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from snapshots_app.models import Job
    from tests.conftest import query_plan

    other = make_project("other")
    Job.objects.bulk_create([Job(project=project, kind="scrub", status="done") for project in (team, other, team)])
    client.force_login(staff)
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/admin/snapshots_app/job/", {"project__id__exact": team.pk}).content.decode()
    assert page.count("field-created_at") == 2  # (the header is "column-created_at")
    listing = [q["sql"] for q in queries.captured_queries
               if q["sql"].startswith('SELECT "snapshots_app_job"') and "ORDER BY" in q["sql"]]
    assert len(listing) == 1 and listing[0].split(" ORDER BY ", 1)[1].startswith(
        '"snapshots_app_job"."created_at" DESC, "snapshots_app_job"."id" DESC')
    plan = query_plan(listing[0])
    assert "job_project_created" in plan and "Sort" not in plan, plan


def session_form(**changes):
    return {"workflow": "research", "status": "running", "metadata": "{}", "tags": '["nightly"]', **changes}


def test_an_operator_corrects_a_sessions_status_metadata_and_tags_in_the_admin_audited(client, clerk, story):
    """A session left `running` by an engine that died, or carrying a bad tag, was read-only in the
    admin: the fix needed an API key and a hand-written PATCH. Its page now changes status, workflow,
    metadata and tags through the same service (and checks) as the API, recorded as session.update."""
    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    client.force_login(clerk)
    url = reverse("admin:sessions_app_workflowsession_change", args=[story.pk])
    page = client.get(url).content.decode()
    assert 'name="_save"' in page and 'name="status"' in page and 'name="head_number"' not in page
    response = client.post(url, session_form(status="failed", metadata='{"owner": "ops", "ticket": 42}',
                                             tags='["nightly", "retention:keep-all"]'))
    assert response.status_code == 302
    story.refresh_from_db()
    assert story.status == "failed" and story.metadata == {"owner": "ops", "ticket": 42}
    assert story.tags == ["nightly", "retention:keep-all"] and story.head_number == 5
    event = AuditEvent.objects.get(action="session.update", session_id=story.pk)
    assert event.actor_label == "clerk"
    assert event.details["status"] == {"before": "running", "after": "failed"}
    assert event.details["tags"]["after"] == ["nightly", "retention:keep-all"]


@pytest.mark.parametrize("changes, problem", [
    ({"metadata": '{"cost": NaN}'}, "(NaN is not a JSON number: write null, or a number)"),
    ({"metadata": '{"cost": Infinity}'}, "not valid JSON"),
    ({"metadata": "[" * 5000 + "]" * 5000}, "not valid JSON"),  # json.loads overflowed the stack: a 500
    ({"metadata": '{"a": ' * 250 + "1" + "}" * 250}, "nests deeper than"),
    ({"metadata": '["not", "an", "object"]'}, "must be a JSON object"),
    ({"metadata": '{"x": 123456789012345678901234567890}'}, "integer 123456789012345678901234567890... is outside"),
    ({"metadata": '{"owner": "ops", "ticket": 42, "owner": "me"}'}, 'it has the key "owner" twice in one object'),
    ({"metadata": '{"blob": "' + "x" * 70_000 + '"}'}, "over the"),
    ({"tags": '["fine", "no!good"]'}, "invalid tag"),
    ({"tags": '"nightly"'}, "must be a JSON list"),
    ({"status": "stuck"}, "Select a valid choice"),
    ({"workflow": "a\x00b"}, "Null characters"),
])
def test_a_bad_session_fix_in_the_admin_says_what_is_wrong_and_stores_nothing(client, staff, story, changes, problem):
    client.force_login(staff)
    url = reverse("admin:sessions_app_workflowsession_change", args=[story.pk])
    response = client.post(url, session_form(**{"status": "failed", **changes}))
    assert response.status_code == 200 and "errornote" in response.content.decode()
    assert problem in html.unescape(response.content.decode())
    story.refresh_from_db()
    assert story.status == "running" and story.metadata == {} and story.tags == ["nightly"]
    assert not AuditEvent.objects.filter(action="session.update").exists()


def test_a_session_fix_in_the_admin_needs_the_operator_role_and_an_unarchived_session(client, clerk, story):
    membership_set(project=story.project, user=clerk, role=Role.VIEWER)
    other = make_session(make_project("globex"), "globex-run")
    client.force_login(clerk)
    url = reverse("admin:sessions_app_workflowsession_change", args=[story.pk])
    assert 'name="_save"' not in client.get(url).content.decode()  # a viewer reads it
    assert client.post(url, session_form(status="failed")).status_code == 403
    foreign = reverse("admin:sessions_app_workflowsession_change", args=[other.pk])
    assert client.post(foreign, session_form(status="failed")).status_code in (302, 404)
    story.refresh_from_db()
    other.refresh_from_db()
    assert story.status == other.status == "running"

    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    session_archive(session=story, reason="done")
    response = client.post(url, session_form(status="failed"))
    assert response.status_code == 200 and "is archived" in response.content.decode()
    story.refresh_from_db()
    assert story.status == "running" and not AuditEvent.objects.filter(action="session.update").exists()


def test_a_session_status_fix_keeps_metadata_stored_under_an_older_larger_limit(client, staff, story, settings):
    big = {"notes": "x" * 3000}
    WorkflowSession.objects.filter(pk=story.pk).update(metadata=big)
    settings.SESSION_METADATA_MAX_BYTES = 1024
    client.force_login(staff)
    url = reverse("admin:sessions_app_workflowsession_change", args=[story.pk])
    response = client.post(url, session_form(status="completed", metadata=json.dumps(big)))
    assert response.status_code == 302
    story.refresh_from_db()
    assert story.status == "completed" and story.metadata == big
    assert set(AuditEvent.objects.get(action="session.update").details) == {"status"}


def _seen_fields(page: str) -> str:
    return html.unescape(re.search(r'name="seen" value="([^"]*)"', page).group(1))


def test_a_session_its_engine_changed_after_the_page_was_opened_is_not_set_back_by_a_save(client, staff, story):
    """The form compared what was posted with the session as it was at the save: a status its engine
    wrote after the page was opened read as the operator's change, and saving the tags alone set the
    session back to running, audited as theirs. Fields nobody touched meanwhile still save."""
    client.force_login(staff)
    url = reverse("admin:sessions_app_workflowsession_change", args=[story.pk])
    seen = _seen_fields(client.get(url).content.decode())
    snapshot_record(session=story, state={"done": True}, status="completed")  # the engine, meanwhile
    response = client.post(url, session_form(tags='["nightly", "checked"]', seen=seen))
    page = html.unescape(response.content.decode())
    assert response.status_code == 200 and "changed since this page was opened" in page and "status is now 'completed'" in page
    story.refresh_from_db()
    assert story.status == "completed" and story.tags == ["nightly"]
    assert not AuditEvent.objects.filter(action="session.update").exists()

    seen = _seen_fields(client.get(url).content.decode())
    snapshot_record(session=story, state={"done": True, "again": 1}, status="completed")  # a step that changed none
    response = client.post(url, session_form(status="completed", tags='["nightly", "checked"]', seen=seen))
    assert response.status_code == 302
    story.refresh_from_db()
    assert story.status == "completed" and story.tags == ["nightly", "checked"]


def test_a_metadata_value_changed_from_1_to_true_is_saved_and_audited(client, staff, story):
    """1 == True == 1.0 in Python: the change read as none, "changed successfully" saved nothing, and
    the API's PATCH answered 200 with the old value."""
    WorkflowSession.objects.filter(pk=story.pk).update(metadata={"approved": 1, "ratio": 2})
    client.force_login(staff)
    url = reverse("admin:sessions_app_workflowsession_change", args=[story.pk])
    seen = _seen_fields(client.get(url).content.decode())
    assert client.post(url, session_form(metadata='{"approved": true, "ratio": 2}', seen=seen)).status_code == 302
    story.refresh_from_db()
    assert orjson.dumps(story.metadata, option=orjson.OPT_SORT_KEYS) == b'{"approved":true,"ratio":2}'
    assert AuditEvent.objects.get(action="session.update").details["metadata"]["after"] == {"approved": True, "ratio": 2}
    answer = key_client(story.project).patch(f"/api/v1/sessions/{story.pk}/", {"metadata": {"approved": True, "ratio": 2.0}},
                                             format="json")
    assert answer.status_code == 200 and orjson.dumps(answer.json()["metadata"]) == b'{"approved":true,"ratio":2.0}'
    assert AuditEvent.objects.filter(action="session.update").count() == 2


def deleted_while_saving(delete: Callable[[], object], save: Callable[[], object]) -> object:
    """What `save()` (an admin POST, on a thread of its own) answers when the row it changes is deleted
    after the admin read it: `delete()` runs in a transaction this thread holds open until the save is
    seen waiting for the row's lock, then commits. (Deleted before the POST, Django's own check answers.)"""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["response"] = save()
        except Exception as exc:  # noqa: BLE001 - raised again below, in the test
            outcome["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    with transaction.atomic():
        delete()
        thread.start()
        assert someone_waits_on_a_lock(thread), "the save did not wait for the row: the race was not run"
    thread.join(60)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["response"]


@pytest.mark.django_db(transaction=True)
def test_a_session_deleted_while_its_fix_is_saved_gets_the_admins_doesnt_exist_message(client, staff, story):
    """Deleted by another operator after the page was opened, the session's fix answered 500 (the
    service found no session under its lock): it is the admin's "doesn't exist", nothing recorded."""
    from sessions_app.services import session_delete

    client.force_login(staff)
    url = reverse("admin:sessions_app_workflowsession_change", args=[story.pk])
    assert client.get(url).status_code == 200
    response = deleted_while_saving(lambda: session_delete(session=story, reason="test run, not needed"),
                                    lambda: client.post(url, session_form(status="failed")))
    assert response.status_code == 302 and response.url == reverse("admin:index")
    page = html.unescape(client.get(response.url).content.decode())
    assert f"Workflow session with ID \u201c{story.pk}\u201d doesn\u2019t exist. Perhaps it was deleted?" in page
    assert not WorkflowSession.objects.filter(pk=story.pk).exists()
    assert not AuditEvent.objects.filter(action="session.update").exists()


@pytest.mark.django_db(transaction=True)
def test_an_api_key_deleted_while_its_expiry_is_saved_gets_the_admins_doesnt_exist_message(client, staff, team):
    client.force_login(staff)
    key, _ = api_key_create(project=team, name="ci", scopes=["read"])
    url = reverse("admin:sessions_app_apikey_change", args=[key.pk])
    assert client.get(url).status_code == 200
    response = deleted_while_saving(lambda: ApiKey.objects.filter(pk=key.pk).delete(),
                                    lambda: client.post(url, {"expires_at_0": "2098-06-30", "expires_at_1": "00:00:00"}))
    assert response.status_code == 302 and response.url == reverse("admin:index")
    page = html.unescape(client.get(response.url).content.decode())
    assert f"Api key with ID \u201c{key.pk}\u201d doesn\u2019t exist. Perhaps it was deleted?" in page
    assert not AuditEvent.objects.filter(action="api_key.expiry").exists()


@pytest.mark.django_db(transaction=True)
def test_a_key_deleted_while_a_bulk_revoke_runs_is_named_and_the_others_are_revoked(client, staff, team):
    """A script deleting one of the selected keys while the confirmed revoke ran made the action 500
    part-way: the keys after it stayed working and the operator was told nothing."""
    client.force_login(staff)
    first, _ = api_key_create(project=team, name="a-engine", scopes=["write"])
    doomed, _ = api_key_create(project=team, name="b-engine", scopes=["write"])
    last, _ = api_key_create(project=team, name="c-engine", scopes=["write"])
    changelist = reverse("admin:sessions_app_apikey_changelist")
    response = deleted_while_saving(
        lambda: ApiKey.objects.filter(pk=doomed.pk).delete(),
        lambda: client.post(changelist, {"action": "revoke", "_selected_action": [first.pk, doomed.pk, last.pk],
                                         "post": "yes"}))
    assert response.status_code == 302
    page = html.unescape(client.get(response.url).content.decode())
    assert "Revoked 2 key(s). Deleted meanwhile, so not revoked: b-engine." in page
    for key in (first, last):
        key.refresh_from_db()
        assert key.revoked_at is not None
    assert sorted(AuditEvent.objects.filter(action="api_key.revoke").values_list("details__name", flat=True)) == [
        "a-engine", "c-engine"]


def policy_form(project, **changes):
    return {"project": project.pk, "enabled": "on", "keep_last": 50, "keep_days": 3, "thin_to": "day", **changes}


def test_a_project_admin_sets_and_changes_its_retention_policy_in_the_admin_audited(client, clerk, story):
    """Retention policies were missing from the admin (the compaction page put the policy in words, but
    changing it took an API key): a project's admins now set it there, audited as in the API."""
    from snapshots_app.models import RetentionPolicy

    membership_set(project=story.project, user=clerk, role=Role.ADMIN)
    client.force_login(clerk)
    response = client.post(reverse("admin:snapshots_app_retentionpolicy_add"), policy_form(story.project))
    assert response.status_code == 302
    policy = RetentionPolicy.objects.get(project=story.project)
    assert (policy.enabled, policy.keep_last, policy.keep_days, policy.thin_to) == (True, 50, 3, "day")
    assert policy.updated_by_label == "clerk"
    url = reverse("admin:snapshots_app_retentionpolicy_change", args=[policy.pk])
    page = client.get(url).content.decode()
    assert "newest 50 versions" in page and 'name="_save"' in page and "Delete" not in page
    assert client.post(url, policy_form(story.project, keep_last=10, enabled="")).status_code == 302
    policy.refresh_from_db()
    assert (policy.enabled, policy.keep_last) == (False, 10)
    events = AuditEvent.objects.filter(action="retention.policy").order_by("id")
    assert [event.actor_label for event in events] == ["clerk", "clerk"]
    assert events[0].details["before"] is None and events[1].details["after"]["keep_last"] == 10
    assert client.post(url, policy_form(story.project, keep_last=10, enabled="")).status_code == 302
    assert events.count() == 2  # the policy it has already: nothing recorded
    assert client.post(reverse("admin:snapshots_app_retentionpolicy_delete", args=[policy.pk]), {"post": "yes"}
                       ).status_code == 403
    assert RetentionPolicy.objects.filter(pk=policy.pk).exists()


def test_a_retention_policy_that_would_remove_versions_is_saved_only_once_the_admin_has_seen_how_many(client, staff,
                                                                                                       story):
    """A policy was saved at once, and the next daily compaction applied it: a typo in keep_last became
    versions gone for good. One that would remove versions now says how many and waits for a tick."""
    from snapshots_app.models import RetentionPolicy

    client.force_login(staff)
    add = reverse("admin:snapshots_app_retentionpolicy_add")
    strict = policy_form(story.project, keep_last=1, keep_days=0, thin_to="none")
    response = client.post(add, strict)
    page = html.unescape(response.content.decode())
    assert response.status_code == 200 and "Nothing was saved: under this policy the next compaction would remove 4 of 5" in page
    assert not RetentionPolicy.objects.exists() and not AuditEvent.objects.filter(action="retention.policy").exists()
    assert client.post(add, {**strict, "confirmed": "on"}).status_code == 302
    policy = RetentionPolicy.objects.get(project=story.project)
    assert (policy.keep_last, policy.thin_to) == (1, "none")
    url = reverse("admin:snapshots_app_retentionpolicy_change", args=[policy.pk])
    assert client.post(url, policy_form(story.project, keep_last=1, keep_days=0, thin_to="none", enabled="")
                       ).status_code == 302  # turning it off asks nothing
    assert client.post(url, policy_form(story.project, keep_last=100)).status_code == 302  # nor one removing none
    assert Version.objects.filter(session=story).count() == 5


@pytest.mark.parametrize("changes, problem", [
    ({"keep_last": -1}, "greater than or equal to 0"),
    ({"keep_days": 2_000_000_000}, "less than or equal to 1000000"),
    ({"keep_last": "many"}, "Enter a whole number"),
    ({"thin_to": "week"}, "Select a valid choice"),
])
def test_a_bad_retention_policy_in_the_admin_says_what_is_wrong_and_stores_nothing(client, staff, story, changes,
                                                                                    problem):
    from snapshots_app.models import RetentionPolicy

    client.force_login(staff)
    response = client.post(reverse("admin:snapshots_app_retentionpolicy_add"), policy_form(story.project, **changes))
    assert response.status_code == 200 and problem in response.content.decode()
    assert not RetentionPolicy.objects.exists() and not AuditEvent.objects.filter(action="retention.policy").exists()


def test_only_a_projects_admins_change_its_retention_policy_and_nobody_sees_another_projects(client, clerk, story):
    from snapshots_app.compaction import retention_policy_set
    from snapshots_app.models import RetentionPolicy

    other = make_project("globex")
    foreign = retention_policy_set(project=other, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    own = retention_policy_set(project=story.project, enabled=True, keep_last=7, keep_days=1, thin_to="hour")
    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    client.force_login(clerk)
    listing = client.get(reverse("admin:snapshots_app_retentionpolicy_changelist")).content.decode()
    assert "Acme" in listing and "globex" not in listing.lower()
    url = reverse("admin:snapshots_app_retentionpolicy_change", args=[own.pk])
    assert 'name="_save"' not in client.get(url).content.decode()  # an operator reads it
    assert client.post(url, policy_form(story.project, keep_last=0, thin_to="none")).status_code == 403
    foreign_url = reverse("admin:snapshots_app_retentionpolicy_change", args=[foreign.pk])
    assert client.post(foreign_url, policy_form(other, keep_last=500)).status_code in (302, 404)
    for project in (story.project, other):
        response = client.post(reverse("admin:snapshots_app_retentionpolicy_add"), policy_form(project))
        assert response.status_code in (200, 403)
    assert {(policy.project_id, policy.keep_last) for policy in RetentionPolicy.objects.all()} == {
        (story.project.pk, 7), (other.pk, 1)}


def archiving(action, *sessions, **data):
    return {"action": action, "_selected_action": [session.pk for session in sessions], **data}


@pytest.mark.parametrize("changelist, param", [
    ("sessions_app/workflowsession", "project__id__exact"), ("snapshots_app/version", "session__project__id__exact"),
    ("sessions_app/auditevent", "project__id__exact"), ("snapshots_app/integrityproblem", "project__id__exact"),
])
def test_staff_of_one_project_filtering_by_another_project_list_nothing_not_everything(client, clerk, story,
                                                                                      changelist, param):
    """Django hides a filter with a single choice and then drops its parameter: for staff in one project,
    an address naming another project's id listed every row of their own under it."""
    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    other = make_project("globex")
    integrity_problem_record(version=Version.objects.get(session=story, number=2), detail="checksum mismatch")
    session_update(session=story, tags=["nightly", "checked"])  # an audit event
    client.force_login(clerk)
    url = f"/admin/{changelist}/"
    assert "run-42" in client.get(url, {param: story.project.pk}).content.decode()
    page = client.get(url, {param: other.pk}).content.decode()
    assert "run-42" not in page


def test_archiving_a_selection_of_sessions_in_the_admin_asks_first_and_audits_each_with_the_reason(client, clerk, story):
    """Archiving (and unarchiving) was on the session page only, one session at a time; the admin had
    no way to. Its actions ask first, warn of sessions an engine may still write, take a reason,
    and record each change; sessions already so are left as they are."""
    membership_set(project=story.project, user=clerk, role=Role.OPERATOR)
    done = make_session(story.project, "run-done")
    WorkflowSession.objects.filter(pk=done.pk).update(status="completed")
    changelist = reverse("admin:sessions_app_workflowsession_changelist")
    client.force_login(clerk)
    ask = client.post(changelist, archiving("archive", story, done))
    page = html.unescape(ask.content.decode())
    assert ask.status_code == 200 and "Archive these 2 session(s)?" in page and "1 of them is <code>running</code>" in page
    assert "run-42" in page and "run-done" in page and 'name="reason"' in page
    assert WorkflowSession.objects.filter(archived_at__isnull=False).count() == 0  # asking changes nothing

    bad = client.post(changelist, archiving("archive", story, done, post="yes", reason="x" * 2001))
    assert bad.status_code == 400 and "reason: " in bad.content.decode()
    assert WorkflowSession.objects.filter(archived_at__isnull=False).count() == 0

    response = client.post(changelist, archiving("archive", story, done, post="yes", reason="quarter closed"))
    assert response.status_code == 302
    assert WorkflowSession.objects.filter(archived_at__isnull=False).count() == 2
    events = AuditEvent.objects.filter(action="session.archive")
    assert {(event.session_id, event.reason, event.actor_label) for event in events} == {
        (story.pk, "quarter closed", "clerk"), (done.pk, "quarter closed", "clerk")}

    again = client.post(changelist, archiving("archive", story, post="yes", reason="again"), follow=True)
    assert "were archived already" in again.content.decode() and events.count() == 2
    client.post(changelist, archiving("unarchive", done, post="yes", reason="reopened"))
    done.refresh_from_db()
    assert done.archived_at is None
    assert AuditEvent.objects.get(action="session.unarchive").reason == "reopened"


def test_a_session_deleted_while_a_selection_is_archived_is_named_and_the_rest_are_archived(client, staff, story,
                                                                                            monkeypatch):
    """Deleted (by the API, another operator) after the action read the selection, one session made the
    action a 500 half-way: those before it archived, those after not, and nothing said which."""
    from sessions_app import admin as sessions_admin
    from sessions_app.services import session_archive as archive_one
    from sessions_app.services import session_delete

    second, third = make_session(story.project, "run-b"), make_session(story.project, "run-c")

    def deleted_first(*, session, **kwargs):
        if session.pk == second.pk:
            session_delete(session=session, reason="removed by someone else")
        return archive_one(session=session, **kwargs)

    monkeypatch.setattr(sessions_admin, "session_archive", deleted_first)  # the deletion, at that moment
    client.force_login(staff)
    response = client.post(reverse("admin:sessions_app_workflowsession_changelist"),
                           archiving("archive", story, second, third, post="yes", reason="quarter closed"), follow=True)
    page = html.unescape(response.content.decode())
    assert response.status_code == 200 and "Archived 2 session(s). Deleted meanwhile, so not archived: run-b." in page
    assert set(AuditEvent.objects.filter(action="session.archive").values_list("session_id", flat=True)) == {
        story.pk, third.pk}


def test_archiving_in_the_admin_needs_the_operator_role_in_every_selected_project(client, clerk, story):
    membership_set(project=story.project, user=clerk, role=Role.VIEWER)
    client.force_login(clerk)
    changelist = reverse("admin:sessions_app_workflowsession_changelist")
    response = client.post(changelist, archiving("archive", story, post="yes", reason="no"))
    assert response.status_code == 403
    story.refresh_from_db()
    assert story.archived_at is None and not AuditEvent.objects.filter(action="session.archive").exists()


def test_archiving_more_sessions_than_one_request_takes_changes_none_and_says_so(client, staff, story, monkeypatch):
    # The confirm page sends back a field per session: past Django's 1,000 fields it was a bare 400.
    monkeypatch.setattr("sessions_app.admin.CONFIRMED_IN_REQUEST", 1)
    other = make_session(story.project, "run-43")
    client.force_login(staff)
    changelist = reverse("admin:sessions_app_workflowsession_changelist")
    response = client.post(changelist, archiving("archive", story, other, post="yes"), follow=True)
    assert "Select at most 1 sessions at a time" in response.content.decode()
    assert not WorkflowSession.objects.filter(archived_at__isnull=False).exists()


def test_a_data_fix_over_a_damaged_head_says_what_recording_does_and_records_it(client, staff, story):
    """With the head failing verification (when a fix is needed most) the preview answered 400 with
    the damage alone, beside a "record" button: it now says the diff cannot be shown and what
    recording does, and recording makes a sound new head, leaving the damaged version as it is."""
    head = Version.objects.get(session=story, number=5)
    StateNode.objects.filter(project=story.project, digest=bytes(head.root)).update(data=b"\x00garbage")
    clear_cache()
    client.force_login(staff)
    url = reverse("admin:snapshots_app_version_data_fix", args=[Version.objects.get(session=story, number=3).pk])
    edited = json.dumps({"counters": {"steps": 3, "tokens": 300}, "pointer": "step-3"})
    preview = client.post(url, {"state": edited, "reason": "", "expected_version": 5, "preview": "1"})
    body = html.unescape(preview.content.decode())
    assert preview.status_code == 200 and "version 5 of session run-42" in body and "failed verification" in body
    assert "recording this state makes a new head on top of it" in body and "Record as new head" in body
    done = client.post(url, {"state": edited, "reason": "head damaged", "expected_version": 5, "apply": "1",
                             "previewed": shown_state(preview)})
    assert done.status_code == 302
    fixed = Version.objects.get(session=story, number=6)
    assert fixed.kind == "data_fix" and AuditEvent.objects.get(action="version.data_fix").reason == "head damaged"


def test_revoking_more_keys_than_one_request_takes_revokes_none_and_says_so(client, staff, team, monkeypatch):
    # A select-all of thousands of keys made a confirm page whose "yes" exceeded Django's 1,000 fields: a bare 400.
    monkeypatch.setattr("sessions_app.admin.CONFIRMED_IN_REQUEST", 1)
    keys = [api_key_create(project=team, name=f"engine-{i}", scopes=["read"])[0] for i in range(2)]
    client.force_login(staff)
    response = client.post(reverse("admin:sessions_app_apikey_changelist"),
                           {"action": "revoke", "_selected_action": [key.pk for key in keys], "index": "0"}, follow=True)
    assert "Select at most 1 keys at a time" in response.content.decode()
    assert not ApiKey.objects.filter(revoked_at__isnull=False).exists()


def test_a_change_page_asks_once_whether_its_project_is_reachable(client, clerk, team):
    """The admin asks has_*_permission several times while drawing one page; for staff who are not
    superusers each asked the database whether they held the role in the row's project (6-7 times)."""
    membership_set(project=team, user=clerk, role=Role.ADMIN)
    key = ApiKey.objects.create(project=team, name="engine-key", prefix="p1", key_hash="x", scopes=["write"])
    session = make_session(team, "run-7")
    client.force_login(clerk)
    for url in (reverse("admin:sessions_app_apikey_change", args=[key.pk]),
                reverse("admin:sessions_app_workflowsession_change", args=[session.pk]),
                reverse("admin:sessions_app_membership_change", args=[Membership.objects.get(user=clerk).pk])):
        with CaptureQueriesContext(connection) as queries:
            page = client.get(url)
        assert page.status_code == 200 and 'name="_save"' in page.content.decode(), url
        role_checks = [query["sql"] for query in queries.captured_queries
                       if query["sql"].startswith('SELECT 1 AS "a" FROM "sessions_app_project"')]
        assert len(role_checks) == 1, url


def test_an_audit_events_page_says_when_and_times_read_to_the_second_with_their_zone(client, staff, story):
    """The event's page said who, what and why but not when; lists wrote "Dec. 7, 2026, 3:25 p.m.",
    so two forks made in one minute could not be ordered, and nothing named the clock."""
    from snapshots_app.services import snapshot_rewind

    snapshot_rewind(session=story, to_version=2, reason="back to the good one", actor=staff)
    event = AuditEvent.objects.get(action="session.rewind")
    stamp = event.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    client.force_login(staff)
    page = client.get(reverse("admin:sessions_app_auditevent_change", args=[event.pk])).content.decode()
    assert re.search(rf"Created at:</label>\s*<div class=\"readonly\">{stamp}</div>", page), stamp
    assert "back to the good one" in page and story.external_id in page
    listed = client.get(reverse("admin:sessions_app_auditevent_changelist")).content.decode()
    assert f">{stamp}</a>" in listed
    # In version numbers, not by the new version's internal key.
    assert '<td class="field-change">v5 → v6, the state of v2</td>' in listed
    assert re.search(r"Change:</label>\s*<div class=\"readonly\">v5 → v6, the state of v2</div>", page)
    from snapshots_app.services import snapshot_fork

    snapshot_fork(session=story, from_version=3, external_id="run-42-alt", reason="what if", actor=staff)
    listed = client.get(reverse("admin:sessions_app_auditevent_changelist")).content.decode()
    assert '<td class="field-change">v3 → run-42-alt</td>' in listed


def test_the_admin_link_is_offered_only_to_staff_it_has_something_to_show(client, team, clerk, staff):
    """Staff without a model permission followed "Admin" to "You don't have permission to view or edit
    anything"."""
    bare = make_user("bare-staff", staff=True)
    for user in (bare, clerk, staff):
        membership_set(project=team, user=user, role=Role.OPERATOR)
    links = {}
    for user in (bare, clerk, staff):
        client.force_login(user)
        links[user.username] = f'href="{reverse("admin:index")}"' in client.get(reverse("sessions:list")).content.decode()
    assert links == {"bare-staff": False, "clerk": True, "root": True}


@pytest.mark.parametrize("address, problem", [
    ("/admin/sessions_app/workflowsession/?status__exact=%00", "cannot contain NUL"),
    ("/admin/snapshots_app/version/?reason__regex=(", "invalid regular expression"),
    ("/admin/sessions_app/auditevent/?action__exact=%00", "cannot contain NUL"),
    ("/admin/sessions_app/workflowsession/?head_number__gt=abc", "expected a number but got 'abc'"),
    ("/admin/sessions_app/workflowsession/?nonsense=1", "Cannot resolve keyword 'nonsense'"),
    ("/admin/sessions_app/workflowsession/?created_at__gte=2026-13-45", "it is an invalid date"),
])
def test_a_list_address_whose_filters_cannot_be_applied_is_a_400_saying_why(client, staff, story, address, problem):
    """The admin takes any lookup on a model's own fields: a NUL or a broken regex in one was a 500, and
    a value it could not read a redirect to "Something's wrong with your database installation"."""
    client.force_login(staff)
    response = client.get(address)
    page = html.unescape(response.content.decode())
    assert response.status_code == 400 and "The filters in this address cannot be applied: " in page, page[:300]
    assert problem in page and "Show the whole list" in page and "run-42" not in page


def test_a_page_past_the_end_of_an_admin_list_says_so(client, staff, story, monkeypatch):
    """Past the last page (or the 10,000 rows a history list counts), the 400 said "IncorrectLookupParameters"."""
    from snapshots_app.admin import VersionAdmin

    monkeypatch.setattr(VersionAdmin, "list_per_page", 2)
    client.force_login(staff)
    assert client.get("/admin/snapshots_app/version/", {"p": 3}).status_code == 200
    response = client.get("/admin/snapshots_app/version/", {"p": 500, "kind__exact": "step"})
    assert response.status_code == 302 and response["Location"] == "/admin/snapshots_app/version/?kind__exact=step"
    page = html.unescape(client.get(response["Location"]).content.decode())
    assert "That page is past the end of this list" in page and "stops counting at 10,000" in page


def test_archiving_the_last_page_of_a_filtered_list_comes_back_to_the_list_not_an_error(client, staff, story,
                                                                                       monkeypatch):
    """After an action Django sends the user back to the same page: emptied by the action, it was a 400."""
    from sessions_app.admin import WorkflowSessionAdmin

    monkeypatch.setattr(WorkflowSessionAdmin, "list_per_page", 2)
    others = [make_session(story.project, f"run-{n}") for n in range(4)]  # 5 sessions, 3 pages
    client.force_login(staff)
    url = "/admin/sessions_app/workflowsession/?archived_at__isempty=1&p=3"
    listed = client.get(url).content.decode()
    last = [session for session in [story, *others] if f">{session.external_id}<" in listed]
    assert len(last) == 1
    done = client.post(url, {"action": "archive", "_selected_action": [last[0].pk], "post": "yes", "reason": "done"})
    assert done.status_code == 302
    back = client.get(done["Location"], follow=True)
    assert back.status_code == 200 and "Archived 1 session(s)." in back.content.decode()
    bad = client.get("/admin/sessions_app/workflowsession/", {"archived_at__isempty": "2"})
    assert bad.status_code == 400 and "a filter's value is not one this list takes" in html.unescape(bad.content.decode())
