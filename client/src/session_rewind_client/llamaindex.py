"""LlamaIndex Workflows (llama-index-workflows 2.x): a version per finished step, and resuming from any version.

    recorder = WorkflowRecorder(AsyncClient(...))
    run = await recorder.run(MyWorkflow(), external_id="order-42", topic="...")   # one version per step
    ctx = await recorder.load_context(MyWorkflow(), run.session_id, version=3)    # after step 2
    result = await MyWorkflow().run(ctx=ctx)                                       # resumes from there

How it works: the run's event stream is read with ``expose_internal=True``; each internal
`StepStateChanged` with ``NOT_RUNNING`` means a step finished, and the serialized context
(``handler.ctx.to_dict()``) is taken at that moment and recorded as a new version with the step
name and the engine's name and version. The context does not record why a run failed, so the
exception of a failed run is attached to the last version as its `error` (status ``failed``).

A context saved after the run stopped (finished or failed: ``is_running`` false) carries leftover
work that corrupts a new run, so `load_context` refuses it unless ``allow_not_running=True``.

A run from a context `load_context` restored from a version that is no longer the head (a resume
from an earlier step) first rewinds its session to that version, so the versions it records
descend from the one it resumed, in a branch of their own, as in the timeline of a dashboard rewind.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    from workflows import Context, Workflow
    from workflows.context.serializers import BaseSerializer
    from workflows.events import Event, InternalDispatchEvent, StepState, StepStateChanged
    from workflows.handler import WorkflowHandler
except ImportError as exc:  # installed without the extra: say which to install
    raise ImportError("session_rewind_client.llamaindex needs LlamaIndex Workflows: "
                      f"pip install './client[llamaindex]' from a Session Rewind checkout, or "
                      f"'session-rewind-client[llamaindex]' from your own package index ({exc})") from exc

from session_rewind_client.client import AsyncClient, Client
from session_rewind_client.errors import SessionRewindError, ValidationError

ENGINE = "llama-index-workflows"
ERROR_MAX = 10_000


def engine_version() -> str:
    try:
        return version(ENGINE)
    except PackageNotFoundError:  # pragma: no cover - only when run from a source checkout
        return "unknown"


# Where each Context `load_context` restored came from: (session id, version number, checksum).
_ORIGINS: weakref.WeakKeyDictionary[Context, tuple[str, int, str]] = weakref.WeakKeyDictionary()


class ContextFromAnotherSession(UserWarning):
    """`run(ctx=...)` with a context load_context read from another session: its versions go on in
    this session, with nothing linking them to where they came from (a fork would)."""


class ContextNotResumable(RuntimeError):
    """The saved context is from a run that had stopped; resuming it would replay leftover work."""


@dataclass
class RecordedRun:
    """What `WorkflowRecorder.run` did: the result (or the error) and the versions it recorded."""

    session_id: str
    result: Any = None
    error: BaseException | None = None
    versions: list[dict[str, Any]] = field(default_factory=list)
    # Seconds spent in ctx.to_dict() per snapshot, to see the overhead grow with the context.
    serialize_seconds: list[float] = field(default_factory=list)
    # Why recording stopped (after retries), if it did; the workflow itself ran on.
    recording_error: SessionRewindError | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass
class _Snapshot:
    step: str
    state: dict[str, Any]
    status: str
    error: str | None = None


def describe_error(exc: BaseException) -> str:
    """The exception as the version's `error`. What that field cannot hold (a NUL, a lone surrogate from
    bytes decoded with surrogateescape) is written out as Python would (\\x00, \\udcff): sent as it was,
    the failed run's last snapshot was refused, and its failure never showed in the timeline."""
    text = f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:ERROR_MAX]


class WorkflowRecorder:
    """Runs workflows and records their context in Session Rewind after every finished step."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        workflow_name: str | None = None,
        tags: list[str] | None = None,
        serializer: BaseSerializer | None = None,
    ) -> None:
        """`serializer` is what ``ctx.to_dict``/``Context.from_dict`` use (default: JSON), e.g.
        ``PickleSerializer()`` for a store holding values JSON cannot carry."""
        if isinstance(client, Client):
            # Else the first call fails inside the run ("can't be used in 'await' expression"), after a
            # blocking request on the event loop.
            raise TypeError("WorkflowRecorder needs an AsyncClient (workflows run on asyncio): "
                            "WorkflowRecorder(AsyncClient(...))")
        self.client = client
        self.workflow_name = workflow_name
        self.tags = tags
        self.serializer = serializer

    def _serialize(self, ctx: Context, recorded: RecordedRun) -> dict[str, Any] | None:
        """The context as a dict, or None (and `recording_error` set) when it cannot be serialized:
        recording stops there, the workflow runs on."""
        try:
            return ctx.to_dict(self.serializer)
        except Exception as exc:  # noqa: BLE001 - the serializer's failure, whatever its type
            if recorded.recording_error is None:
                recorded.recording_error = ValidationError(
                    f"the workflow context cannot be serialized ({describe_error(exc)}); recording stopped. "
                    "Pass WorkflowRecorder(serializer=...) (e.g. PickleSerializer()) for such values."
                )
            return None

    async def run(
        self,
        workflow: Workflow,
        *,
        external_id: str,
        ctx: Context | None = None,
        raise_on_error: bool = False,
        on_event: Callable[[WorkflowHandler, Event], Awaitable[None] | None] | None = None,
        on_start: Callable[[WorkflowHandler], Awaitable[None] | None] | None = None,
        **run_kwargs: Any,
    ) -> RecordedRun:
        """Run `workflow` (fresh, or from `ctx`), recording a version per finished step.

        Versions are written by a background task in order, so the workflow never waits for the
        network; the context is serialized synchronously when the step-finished event is read.
        A failed run returns a `RecordedRun` with `error` set; if the service refused a snapshot,
        recording stops there (the run goes on) and `recording_error` says why. With
        `raise_on_error` either is raised instead. Cancelling the call (``asyncio.wait_for``,
        ``task.cancel()``) cancels the workflow too, and snapshots not yet written are dropped.

        `on_event(handler, event)` (plain or async) sees every event the workflow writes to its
        stream, e.g. an ``InputRequiredEvent`` to answer with
        ``handler.ctx.send_event(HumanResponseEvent(...))`` (human in the loop). If it raises, the
        run is cancelled and recorded as failed with that error.

        `on_start(handler)` (plain or async) is called once, as soon as the run has started. A context
        restored while it waited for a human does not ask again (its ``InputRequiredEvent`` was streamed
        before it was saved), so the answer is sent here:
        ``on_start=lambda handler: handler.ctx.send_event(HumanResponseEvent(response="yes"))``. If it
        raises, the run is cancelled and recorded as failed with that error.
        """
        session = await self.client.create_session(
            external_id, workflow=self.workflow_name or type(workflow).__name__, tags=self.tags,
        )
        recorded = RecordedRun(session_id=session["id"])
        origin = _ORIGINS.pop(ctx, None) if ctx is not None else None
        if origin is not None and origin[0] == str(session["id"]) and origin[1] != session.get("head"):
            await self._branch_from(origin, recorded)
        elif origin is not None and origin[0] != str(session["id"]):
            warnings.warn(
                f"this context was loaded from session {origin[0]} v{origin[1]}; its run is recorded in "
                f"{external_id!r}, which nothing links to that version. To keep the lineage, fork it: "
                f"client.fork({origin[0]!r}, {origin[1]}, reason=..., external_id={external_id!r}), then load the "
                "fork's head and run that", ContextFromAnotherSession, stacklevel=2,
            )
        queue: asyncio.Queue[_Snapshot | None] = asyncio.Queue()
        writer = asyncio.create_task(self._write_all(queue, recorded))

        handler = workflow.run(ctx=ctx, **run_kwargs) if ctx is not None else workflow.run(**run_kwargs)
        # Steps that finished once the run had stopped (the failing one, or several when steps ran in
        # parallel): their status is only known when the handler is awaited.
        stopped: list[_Snapshot] = []
        try:
            if on_start is not None:
                try:
                    starting = on_start(handler)
                    if inspect.isawaitable(starting):
                        await starting
                except Exception:
                    await handler.cancel_run()
                    raise
            async for event in handler.stream_events(expose_internal=True):
                if on_event is not None and not isinstance(event, InternalDispatchEvent):
                    try:
                        answered = on_event(handler, event)
                        if inspect.isawaitable(answered):
                            await answered
                    except Exception:
                        # The run is reported failed with the callback's error: it must not go on
                        # unrecorded in the background.
                        await handler.cancel_run()
                        raise
                if not (isinstance(event, StepStateChanged) and event.step_state == StepState.NOT_RUNNING):
                    continue
                started = time.perf_counter()
                state = self._serialize(handler.ctx, recorded)
                recorded.serialize_seconds.append(time.perf_counter() - started)
                if state is None:
                    continue
                snapshot = _Snapshot(step=event.name, state=state, status="running")
                if state.get("is_running", True):
                    queue.put_nowait(snapshot)
                else:
                    stopped.append(snapshot)
            recorded.result = await handler
            final_status, error = "completed", None
        except asyncio.CancelledError:
            # Cancelled from outside (asyncio.wait_for, task.cancel(), Ctrl-C): the workflow must not
            # go on unrecorded in the background, nor the writer wait for snapshots forever.
            writer.cancel()
            await handler.cancel_run()
            raise
        except Exception as exc:  # noqa: BLE001 - a failing step is recorded, then reported
            recorded.error = exc
            final_status, error = "failed", describe_error(exc)
        if not stopped and (final_state := self._serialize(handler.ctx, recorded)) is not None:
            stopped.append(_Snapshot(step="", state=final_state, status=final_status))
        for snapshot in stopped[:-1]:
            snapshot.status = ""
            queue.put_nowait(snapshot)
        if stopped:
            stopped[-1].status, stopped[-1].error = final_status, error
            queue.put_nowait(stopped[-1])
        queue.put_nowait(None)
        await writer
        if raise_on_error and (recorded.error or recorded.recording_error):
            raise recorded.error or recorded.recording_error  # type: ignore[misc]
        return recorded

    async def _branch_from(self, origin: tuple[str, int, str], recorded: RecordedRun) -> None:
        """Rewind to the version the context was restored from, unless the head holds that state
        already: without it the versions of this run would read as following the head (a failed
        step's state, say) instead of the version they resumed. A refused rewind stops recording."""
        session_id, number, checksum = origin
        try:
            newest = (await self.client.list_versions(session_id, limit=1))["results"]
            if newest and newest[0].get("checksum") == checksum:
                return
            await self.client.rewind(session_id, number, reason=f"{ENGINE}: run resumed from version {number}")
        except SessionRewindError as exc:
            recorded.recording_error = exc

    async def _write_all(self, queue: asyncio.Queue[_Snapshot | None], recorded: RecordedRun) -> None:
        engine_ver = engine_version()
        while (snapshot := await queue.get()) is not None:
            if recorded.recording_error is not None:
                continue  # versions after a refused one would leave a hole in the history
            try:
                version_ = await self.client.record(
                    recorded.session_id,
                    snapshot.state,
                    step=snapshot.step or None,
                    status=snapshot.status or None,
                    error=snapshot.error,
                    engine=ENGINE,
                    engine_version=engine_ver,
                )
            except SessionRewindError as exc:
                recorded.recording_error = exc
                continue
            recorded.versions.append(version_)

    async def load_context(
        self,
        workflow: Workflow,
        session_id: str,
        *,
        version: int | None = None,
        allow_not_running: bool = False,
    ) -> Context:
        """A `Context` restored from a version (default: the head), ready for ``workflow.run(ctx=...)``."""
        found = await (self.client.head(session_id) if version is None else self.client.get_version(session_id, version))
        ctx = context_from_state(workflow, found["state"], allow_not_running=allow_not_running, where=found,
                                 serializer=self.serializer)
        _ORIGINS[ctx] = (str(found.get("session") or session_id), int(found["number"]), str(found.get("checksum")))
        return ctx


def context_from_state(
    workflow: Workflow,
    state: dict[str, Any],
    *,
    allow_not_running: bool = False,
    where: dict[str, Any] | None = None,
    serializer: BaseSerializer | None = None,
) -> Context:
    """`Context.from_dict`, refusing a context saved after its run had stopped (unless allowed)."""
    if not state.get("is_running", False) and not allow_not_running:
        label = f"version {where.get('number')} (step {where.get('step') or '-'}, status {where.get('status') or '-'})" if where else "this context"
        raise ContextNotResumable(
            f"{label} was saved after the run had stopped (is_running is false): a finished or failed context "
            "carries leftover work that corrupts a new run. Rewind to a version taken while the run was still "
            "running (e.g. the one after the last good step), or pass allow_not_running=True to start a new run "
            "that only keeps its state."
        )
    return Context.from_dict(workflow, state, serializer)
