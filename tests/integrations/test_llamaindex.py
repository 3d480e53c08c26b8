"""LlamaIndex Workflows on Session Rewind, end to end against a live server: a version per finished
step, a failure recorded with its exception, a rewind to the version after step 2, and a resume
that ends with the same result as a clean run."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from session_rewind_client.llamaindex import ENGINE, ContextNotResumable, WorkflowRecorder
from workflows import Context, Workflow, step
from workflows.events import Event, HumanResponseEvent, InputRequiredEvent, StartEvent, StopEvent


class Fetched(Event):
    total: int


class Priced(Event):
    total: int


class Charged(Event):
    total: int


class Order(Workflow):
    """Four steps; `charge` fails while `fail_charge` is set (a flaky payment provider)."""

    def __init__(self, *, fail_charge: bool = False, **kwargs) -> None:
        super().__init__(timeout=30, **kwargs)
        self.fail_charge = fail_charge

    @step
    async def fetch(self, ctx: Context, ev: StartEvent) -> Fetched:
        await ctx.store.set("log", ["fetch"])
        return Fetched(total=ev.quantity * 10)

    @step
    async def price(self, ctx: Context, ev: Fetched) -> Priced:
        await ctx.store.set("log", [*await ctx.store.get("log"), "price"])
        return Priced(total=ev.total + 5)

    @step
    async def charge(self, ctx: Context, ev: Priced) -> Charged:
        if self.fail_charge:
            raise RuntimeError("payment provider timed out")
        await ctx.store.set("log", [*await ctx.store.get("log"), "charge"])
        return Charged(total=ev.total)

    @step
    async def ship(self, ctx: Context, ev: Charged) -> StopEvent:
        return StopEvent(result={"total": ev.total, "log": [*await ctx.store.get("log"), "ship"]})


def test_fails_half_way_rewinds_to_step_two_and_resumes_to_the_clean_result(live_api, rewind):
    async def main():
        clean = await Order().run(quantity=3)
        async with live_api.aclient() as client:
            recorder = WorkflowRecorder(client)
            failed = await recorder.run(Order(fail_charge=True), external_id="order-1", quantity=3)
            head_refused = None
            try:
                await recorder.load_context(Order(), failed.session_id)
            except ContextNotResumable as exc:
                head_refused = exc
            after_price = next(v for v in failed.versions if v["step"] == "price")
            await client.rewind(failed.session_id, after_price["number"], reason="retry the charge")
            ctx = await recorder.load_context(Order(), failed.session_id)
            resumed = await recorder.run(Order(), external_id="order-1", ctx=ctx)
            return clean, failed, head_refused, resumed

    clean, failed, head_refused, resumed = asyncio.run(main())

    assert failed.failed and isinstance(failed.error, RuntimeError)
    assert [(v["step"], v["status"]) for v in failed.versions] == [
        ("fetch", "running"), ("price", "running"), ("charge", "failed"),
    ]
    assert failed.versions[-1]["error"] == "RuntimeError: payment provider timed out"
    assert {v["engine"] for v in failed.versions} == {ENGINE} and failed.versions[0]["engine_version"].startswith("2.")
    assert "was saved after the run had stopped" in str(head_refused)

    assert resumed.error is None and resumed.result == clean == {"total": 35, "log": ["fetch", "price", "charge", "ship"]}
    timeline = [(v["number"], v["kind"], v["step"], v["status"]) for v in rewind.iter_versions(failed.session_id)]
    assert timeline[::-1] == [
        (1, "step", "fetch", "running"), (2, "step", "price", "running"), (3, "step", "charge", "failed"),
        (4, "rewind", "price", "running"), (5, "step", "charge", "running"), (6, "step", "ship", "completed"),
    ]
    stored = rewind.get_version(failed.session_id, 2)["state"]
    assert stored["is_running"] is True and stored["state"]["state_data"]["_data"]["log"] == '["fetch", "price"]'


def test_a_run_resumed_from_an_earlier_version_records_a_branch_from_it(live_api, rewind):
    async def main():
        async with live_api.aclient() as client:
            recorder = WorkflowRecorder(client)
            failed = await recorder.run(Order(fail_charge=True), external_id="order-resumed", quantity=3)
            after_price = next(v for v in failed.versions if v["step"] == "price")
            ctx = await recorder.load_context(Order(), failed.session_id, version=after_price["number"])
            resumed = await recorder.run(Order(), external_id="order-resumed", ctx=ctx)
            # Resumed again from that version while the head holds its state (an operator's rewind to
            # it): nothing to rewind.
            await client.rewind(failed.session_id, after_price["number"], reason="once more")
            ctx = await recorder.load_context(Order(), failed.session_id, version=after_price["number"])
            again = await recorder.run(Order(), external_id="order-resumed", ctx=ctx)
            return failed, resumed, again

    failed, resumed, again = asyncio.run(main())
    assert resumed.result == again.result == {"total": 35, "log": ["fetch", "price", "charge", "ship"]}
    timeline = [(v["number"], v["kind"], v["parent"], v["step"]) for v in rewind.iter_versions(failed.session_id)]
    # Not (4, "step", 3, "charge"): the resumed run continued from version 2, not from the failed charge.
    assert timeline[::-1] == [
        (1, "step", None, "fetch"), (2, "step", 1, "price"), (3, "step", 2, "charge"),
        (4, "rewind", 2, "price"), (5, "step", 4, "charge"), (6, "step", 5, "ship"),
        (7, "rewind", 2, "price"), (8, "step", 7, "charge"), (9, "step", 8, "ship"),
    ]
    assert rewind.get_version(failed.session_id, 4)["reason"] == f"{ENGINE}: run resumed from version 2"


def test_a_context_from_another_session_run_in_this_one_warns_and_names_the_fork(live_api, rewind):
    """Its versions went on in the other session silently: a timeline whose v4 held another session's state,
    its parent v3 of this one."""
    from session_rewind_client.llamaindex import ContextFromAnotherSession

    async def main():
        async with live_api.aclient() as client:
            recorder = WorkflowRecorder(client)
            source = await recorder.run(Order(fail_charge=True), external_id="order-source", quantity=2)
            ctx = await recorder.load_context(Order(), source.session_id, version=2)
            with pytest.warns(ContextFromAnotherSession, match=rf"client.fork\('{source.session_id}', 2, "):
                elsewhere = await recorder.run(Order(), external_id="order-elsewhere", ctx=ctx)
            return source, elsewhere

    source, elsewhere = asyncio.run(main())
    assert elsewhere.result["log"] == ["fetch", "price", "charge", "ship"]  # it still runs, as asked
    assert len(rewind.list_versions(source.session_id)["results"]) == len(source.versions)  # the source untouched


def test_a_stopped_context_is_refused_unless_allowed(live_api):
    async def main():
        async with live_api.aclient() as client:
            recorder = WorkflowRecorder(client)
            done = await recorder.run(Order(), external_id="order-2", quantity=1)
            with pytest.raises(ContextNotResumable):
                await recorder.load_context(Order(), done.session_id)
            ctx = await recorder.load_context(Order(), done.session_id, allow_not_running=True)
            # Any version taken while the run was going resumes directly, no rewind needed.
            after_fetch = await recorder.load_context(Order(), done.session_id, version=1)
            again = await Order().run(ctx=after_fetch)
            return done, ctx, again

    done, ctx, again = asyncio.run(main())
    assert done.result == again == {"total": 15, "log": ["fetch", "price", "charge", "ship"]}
    assert done.versions[-1]["status"] == "completed" and isinstance(ctx, Context)


class Job(Event):
    n: int


class JobDone(Event):
    square: int


class FanOut(Workflow):
    """Four jobs on two parallel workers, gathered at the end; job `fail_on` raises."""

    def __init__(self, *, fail_on: int | None = None) -> None:
        super().__init__(timeout=30)
        self.fail_on = fail_on

    @step
    async def start(self, ctx: Context, ev: StartEvent) -> Job | None:
        for n in range(4):
            ctx.send_event(Job(n=n))
        return None

    @step(num_workers=2)
    async def work(self, ctx: Context, ev: Job) -> JobDone:
        await asyncio.sleep(0.01 * (ev.n + 1))
        if ev.n == self.fail_on:
            raise ValueError(f"job {ev.n} broke")
        return JobDone(square=ev.n * ev.n)

    @step
    async def gather(self, ctx: Context, ev: JobDone) -> StopEvent | None:
        done = ctx.collect_events(ev, [JobDone] * 4)
        return None if done is None else StopEvent(result=sorted(e.square for e in done))


def test_parallel_workers_resume_from_the_last_good_version(live_api):
    async def main():
        clean = await FanOut().run()
        async with live_api.aclient() as client:
            recorder = WorkflowRecorder(client)
            failed = await recorder.run(FanOut(fail_on=3), external_id="fan-1")
            last_good = [v for v in failed.versions if v["status"] == "running"][-1]
            await client.rewind(failed.session_id, last_good["number"], reason="job 3 can run now")
            resumed = await recorder.run(FanOut(), external_id="fan-1",
                                         ctx=await recorder.load_context(FanOut(), failed.session_id))
            return clean, failed, resumed

    clean, failed, resumed = asyncio.run(main())
    assert failed.versions[-1]["status"] == "failed" and failed.versions[-1]["error"] == "ValueError: job 3 broke"
    assert sum(v["step"] == "work" for v in failed.versions) == 4
    assert resumed.result == clean == [0, 1, 4, 9]


def test_a_refused_snapshot_stops_recording_but_not_the_workflow(live_api, settings):
    settings.STATE_MAX_BYTES = 300  # every context of this workflow is larger

    async def main():
        async with live_api.aclient() as client:
            return await WorkflowRecorder(client).run(Order(), external_id="order-3", quantity=2)

    run = asyncio.run(main())
    assert run.result == {"total": 25, "log": ["fetch", "price", "charge", "ship"]} and run.versions == []
    assert run.recording_error.status == 413 and run.recording_error.code == "state_too_large"


class Garbled(Workflow):
    @step
    async def read(self, ctx: Context, ev: StartEvent) -> Priced:
        return Priced(total=1)

    @step
    async def parse(self, ctx: Context, ev: Priced) -> StopEvent:
        raw = b"\x00\xff tool output".decode("utf-8", "surrogateescape")  # a subprocess's bytes, say
        raise ValueError(f"cannot parse {raw}")


def test_a_failure_whose_message_holds_a_nul_or_stray_bytes_is_recorded(live_api):
    async def main():
        async with live_api.aclient() as client:
            return await WorkflowRecorder(client).run(Garbled(timeout=10), external_id="garbled")

    run = asyncio.run(main())
    # The last snapshot used to be refused (a NUL in `error`; a lone surrogate could not even be sent):
    # recording stopped, and the timeline showed the run as still running.
    assert run.failed and run.recording_error is None
    assert run.versions[-1]["status"] == "failed"
    assert run.versions[-1]["error"] == "ValueError: cannot parse \\x00\\udcff tool output"


class Dated(Workflow):
    @step
    async def stamp(self, ctx: Context, ev: StartEvent) -> Priced:
        await ctx.store.set("when", datetime(2024, 1, 1))
        return Priced(total=1)

    @step
    async def finish(self, ctx: Context, ev: Priced) -> StopEvent:
        return StopEvent(result=str(await ctx.store.get("when")))


def test_a_context_json_cannot_carry_stops_recording_not_the_run_and_a_serializer_records_it(live_api):
    from workflows.context.serializers import PickleSerializer

    async def main() -> None:
        async with live_api.aclient() as client:
            plain = await WorkflowRecorder(client).run(Dated(timeout=10), external_id="dated-json")
            assert plain.result == "2024-01-01 00:00:00" and plain.error is None
            assert "cannot be serialized" in str(plain.recording_error) and plain.versions == []

            recorder = WorkflowRecorder(client, serializer=PickleSerializer())
            pickled = await recorder.run(Dated(timeout=10), external_id="dated-pickle")
            assert [v["step"] for v in pickled.versions] == ["stamp", "finish"]
            ctx = await recorder.load_context(Dated(timeout=10), pickled.session_id, version=1)
            assert await ctx.store.get("when") == datetime(2024, 1, 1)

    asyncio.run(main())


class Approval(Workflow):
    """Asks a human before it ships (human in the loop)."""

    @step
    async def ask(self, ctx: Context, ev: StartEvent) -> InputRequiredEvent:
        await ctx.store.set("order", ev.order)
        return InputRequiredEvent(prefix=f"ship {ev.order}?")

    @step
    async def decide(self, ctx: Context, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result={"order": await ctx.store.get("order"), "approved": ev.response == "yes"})


def test_a_human_answers_an_input_request_through_on_event(live_api):
    asked: list[str] = []

    async def answer(handler, event):
        if isinstance(event, InputRequiredEvent):
            asked.append(event.prefix)
            handler.ctx.send_event(HumanResponseEvent(response="yes"))

    async def main():
        async with live_api.aclient() as client:
            return await WorkflowRecorder(client).run(Approval(timeout=10), external_id="approval-1", order="A-7",
                                                      on_event=answer)

    run = asyncio.run(main())
    assert asked == ["ship A-7?"] and run.error is None
    assert run.result == {"order": "A-7", "approved": True}
    assert [v["step"] for v in run.versions][-1] == "decide" and run.versions[-1]["status"] == "completed"


def test_a_failing_on_event_stops_the_run_and_is_recorded(live_api):
    def refuse(handler, event):
        if isinstance(event, InputRequiredEvent):
            raise RuntimeError("no human on call")

    async def main():
        async with live_api.aclient() as client:
            run = await WorkflowRecorder(client).run(Approval(timeout=30), external_id="approval-2", order="B-1",
                                                     on_event=refuse)
            await asyncio.sleep(0.1)
            left = [task for task in asyncio.all_tasks() if task is not asyncio.current_task() and not task.done()]
            return run, left

    run, left = asyncio.run(main())
    assert isinstance(run.error, RuntimeError) and run.result is None
    assert run.versions[-1]["status"] == "failed" and "no human on call" in run.versions[-1]["error"]
    assert left == []  # the workflow was cancelled, not left waiting for an answer in the background


def test_a_run_that_stopped_while_waiting_for_a_human_resumes_with_the_answer_sent_on_start(live_api, rewind):
    asked: list[str] = []

    async def main():
        async with live_api.aclient() as client:
            async def die_waiting(handler, event):
                if isinstance(event, InputRequiredEvent):
                    asked.append(event.prefix)
                    for _ in range(200):  # until the context waiting for the answer is recorded
                        if (await client.list_sessions(external_id="approval-3"))["results"][0]["head"]:
                            break
                        await asyncio.sleep(0.05)
                    raise RuntimeError("the process died while the question was open")

            recorder = WorkflowRecorder(client)
            stopped = await recorder.run(Approval(timeout=30), external_id="approval-3", order="C-9",
                                         on_event=die_waiting)
            waiting = next(v for v in stopped.versions if v["step"] == "ask")
            ctx = await recorder.load_context(Approval(timeout=10), stopped.session_id, version=waiting["number"])
            # The restored context does not ask again: on_event alone would wait until the timeout.
            resumed = await recorder.run(
                Approval(timeout=10), external_id="approval-3", ctx=ctx, on_event=die_waiting,
                on_start=lambda handler: handler.ctx.send_event(HumanResponseEvent(response="yes")),
            )
            return stopped, resumed

    stopped, resumed = asyncio.run(main())
    assert isinstance(stopped.error, RuntimeError) and asked == ["ship C-9?"]
    assert resumed.error is None and resumed.result == {"order": "C-9", "approved": True}
    assert resumed.versions[-1]["step"] == "decide" and resumed.versions[-1]["status"] == "completed"


class Slow(Workflow):
    ran: list[str] = []

    @step
    async def first(self, ctx: Context, ev: StartEvent) -> Priced:
        self.ran.append("first")
        return Priced(total=1)

    @step
    async def second(self, ctx: Context, ev: Priced) -> StopEvent:
        await asyncio.sleep(1)
        self.ran.append("second")
        return StopEvent(result="done")


def test_a_cancelled_run_stops_the_workflow_and_leaves_no_task_behind(live_api, rewind):
    async def main():
        async with live_api.aclient() as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(WorkflowRecorder(client).run(Slow(timeout=30), external_id="slow-1"), 0.5)
            await asyncio.sleep(1.5)
            left = [task for task in asyncio.all_tasks() if task is not asyncio.current_task() and not task.done()]
            return left

    Slow.ran = []
    left = asyncio.run(main())
    # It used to run on, unrecorded, after the caller had given up on it, and its writer waited forever.
    assert Slow.ran == ["first"] and left == []
    session = rewind.list_sessions(external_id="slow-1")["results"][0]
    assert [v["step"] for v in rewind.iter_versions(session["id"])] in ([], ["first"])


def test_a_blocking_client_is_refused_when_the_recorder_is_made(live_api, rewind):
    # It used to make the session (a blocking request on the event loop), then fail inside the run
    # with "object dict can't be used in 'await' expression".
    with pytest.raises(TypeError, match=r"WorkflowRecorder\(AsyncClient"):
        WorkflowRecorder(rewind)
