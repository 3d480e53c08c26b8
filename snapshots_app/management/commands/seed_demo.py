"""Create a demo project, an operator account and a few sessions with realistic histories.

Idempotent: a second run finds everything in place and changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from sessions_app.models import Project, Role, WorkflowSession
from sessions_app.services import membership_set, project_create, session_get_or_create
from snapshots_app.services import snapshot_fork, snapshot_record, snapshot_rewind

DEMO_PROJECT = "demo"
DEMO_USER = "operator"
DEMO_PASSWORD = "rewind-demo"


RESEARCH_STEPS: list[tuple[str, str, str | None]] = [
    ("plan", "user", "Compare PostgreSQL logical replication with physical streaming replication."),
    ("search", "tool", "Found 14 documents about replication modes."),
    ("read", "tool", "Logical replication streams row changes per publication; physical ships WAL."),
    ("summarise", "assistant", "Logical replication works per table and across major versions."),
    ("fetch_benchmarks", "tool", None),  # times out
]
SUPPORT_STEPS: list[tuple[str, str, str | None]] = [
    ("greet", "user", "My order #48213 arrived damaged. Can I get a replacement?"),
    ("lookup_order", "tool", "Order #48213: 1 x ceramic teapot, delivered 2 days ago, eligible for replacement."),
    ("ask_photo", "assistant", "Sorry about that! Could you send a photo of the damage so I can start the replacement?"),
]


def _agent_states(
    system: str = "You are a careful research assistant.", steps: list[tuple[str, str, str | None]] = RESEARCH_STEPS
) -> list[tuple[str, dict[str, Any], str]]:
    """(step, state, error) for a chat agent; a step without content is a tool call that times out."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    state: dict[str, Any] = {
        "messages": messages, "counters": {"llm_calls": 0, "tool_calls": 0, "tokens": 0},
        "scratchpad": "", "tool_result": None, "queue": ["plan"], "pointer": "start", "error": None,
    }
    history = []
    for index, (step, role, content) in enumerate(steps):
        state = json.loads(json.dumps(state))
        state["pointer"] = step
        state["counters"]["llm_calls"] += 1
        state["counters"]["tokens"] += 350 + 40 * index
        state["queue"] = [s for s, _, _ in steps[index + 1 :]][:2]
        error = ""
        if content is None:
            state["counters"]["tool_calls"] += 1
            state["error"] = {"type": "TimeoutError", "message": "benchmark service did not answer in 30 s"}
            error = "TimeoutError: benchmark service did not answer in 30 s"
        else:
            state["messages"].append({"role": role, "content": content, "step": index})
            if role == "tool":
                state["counters"]["tool_calls"] += 1
                state["tool_result"] = {"step": step, "text": content * 20}
            state["scratchpad"] += f"[{step}] ok\n"
        history.append((step, state, error))
    return history


def _llama_states() -> list[tuple[str, dict[str, Any], str]]:
    """A LlamaIndex-style context: store values are JSON text inside the JSON."""
    history = []
    store: dict[str, Any] = {"documents": [], "answer": None}
    for index, step in enumerate(["load", "chunk", "embed", "retrieve", "synthesize"]):
        if step in ("load", "chunk"):
            store["documents"].append({"id": f"doc-{index}", "text": f"Chunk {index} " + "lorem ipsum " * 40})
        if step == "synthesize":
            store["answer"] = "Replication choice depends on version skew and table granularity."
        state = {
            "state": {"state_data": {key: json.dumps(value) for key, value in store.items()}, "state_type": "DictState"},
            "streaming_queue": "[]",
            "queues": {"_done": "[]", step: "[]"},
            "is_running": step != "synthesize",
            "in_progress": {step: []},
        }
        history.append((step, json.loads(json.dumps(state)), ""))
    return history


class Command(BaseCommand):
    help = "Create the demo project, an operator login and sample sessions (idempotent)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--on-real-database", action="store_true",
            help="seed a database named by DATABASE_URL too (a throwaway one: the demo login is a superuser "
                 "whose password is published)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.EMBEDDED and not options["on_real_database"]:
            # `operator` / `rewind-demo` is in README: run against a real database by mistake (a shell
            # with DATABASE_URL set), this would open it to anyone who read it.
            raise CommandError(
                f"seed_demo makes a superuser whose password is published ({DEMO_USER} / {DEMO_PASSWORD}), so it "
                "runs on the embedded SQLite default only (DATABASE_URL is set). For a throwaway database, "
                "pass --on-real-database."
            )
        User = get_user_model()
        with transaction.atomic():
            user = User.objects.filter(username=DEMO_USER).first()
            if user is None:
                user = User.objects.create_user(DEMO_USER, password=DEMO_PASSWORD, is_staff=True, is_superuser=True)
            project = Project.objects.filter(slug=DEMO_PROJECT).first() or project_create(
                name="Demo project", slug=DEMO_PROJECT, owner=user
            )
            membership_set(project=project, user=user, role=Role.ADMIN)

        def seed(external_id: str, workflow: str, history: list, *, status: str) -> WorkflowSession:
            session, _ = session_get_or_create(
                project=project, external_id=external_id, workflow=workflow, tags=["demo"], actor=user
            )
            if session.head_number == 0:
                for index, (step, state, error) in enumerate(history):
                    last = index == len(history) - 1
                    snapshot_record(
                        session=session, state=state, step=step, error=error,
                        status=("failed" if error else status if last else "running"),
                        engine="demo", engine_version="1.0", actor=user, expected_version=index,
                    )
                session.refresh_from_db()
            return session

        agent = seed("research-agent-0001", "research_agent", _agent_states(), status="running")
        if agent.head_number == 5:
            snapshot_rewind(session=agent, to_version=4, reason="Benchmark service timed out; retry from the summary",
                            actor=user)
            snapshot_fork(session=agent, from_version=3, external_id="research-agent-0001-alt",
                          reason="Try a different summary prompt", actor=user)
        seed("llama-rag-0002", "rag_pipeline", _llama_states(), status="completed")
        seed("support-chat-0003", "support_chat", _agent_states("You are a friendly support agent for a homeware shop.",
                                                          SUPPORT_STEPS), status="waiting")

        self.stdout.write(self.style.SUCCESS("Demo data ready: project 'demo' with sample sessions."))
        self.stdout.write(f"Log in as {DEMO_USER} / {DEMO_PASSWORD}")
