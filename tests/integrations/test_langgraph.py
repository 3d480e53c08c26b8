"""LangGraph on Session Rewind, end to end against a live server: LangGraph's own conformance suite,
then real graphs (sync and async) with history, time travel and update_state forks."""

from __future__ import annotations

import asyncio
import json
import operator
import re
from enum import Enum, IntEnum
from typing import Annotated, Any, TypedDict

from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import BASE_CAPABILITIES
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from session_rewind_client.langgraph import SessionRewindSaver


def test_conformance_suite_passes(live_api):
    @checkpointer_test(name="SessionRewindSaver")
    async def saver_factory():
        async with live_api.aclient() as aclient:
            yield SessionRewindSaver(aclient=aclient)

    report = asyncio.run(validate(saver_factory))
    report.print_report()
    failures = {name: result.failures for name, result in report.results.items() if result.passed is False}
    assert report.passed_all_base(), failures
    assert {cap.value for cap in BASE_CAPABILITIES} <= {name for name, r in report.results.items() if r.passed}
    for extended in ("copy_thread", "prune"):
        assert report.results[extended].passed, report.results[extended].failures


def test_a_client_of_the_wrong_kind_is_refused_naming_the_right_one(live_api):
    import pytest

    # An AsyncClient given as the (sync) client used to fail only at the first checkpoint, as an
    # unawaited coroutine (invoke) or "this saver has no AsyncClient" (ainvoke).
    aclient = live_api.aclient()
    with pytest.raises(TypeError, match=r"aclient=AsyncClient"):
        SessionRewindSaver(aclient)
    asyncio.run(aclient.aclose())
    with pytest.raises(TypeError, match=r"aclient=AsyncClient"), live_api.client() as client:
        SessionRewindSaver(aclient=client)


class Trip(TypedDict):
    city: str
    log: Annotated[list[str], operator.add]


def plan(state: Trip) -> dict:
    return {"log": [f"plan {state['city']}"]}


def book(state: Trip) -> dict:
    return {"log": [f"book {state['city']}"]}


def confirm(state: Trip) -> dict:
    return {"log": [f"confirm {state['city']}"]}


def chain(state: type, *nodes: tuple[str, Any]) -> StateGraph:
    """A graph (not compiled) that runs `nodes`, (name, node) each, one after another from START to END."""
    builder = StateGraph(state)
    previous = START
    for name, node in nodes:
        builder.add_node(name, node)
        builder.add_edge(previous, name)
        previous = name
    builder.add_edge(previous, END)
    return builder


def trip_graph(saver: SessionRewindSaver):
    return chain(Trip, ("plan", plan), ("book", book), ("confirm", confirm)).compile(checkpointer=saver)


def test_graph_history_time_travel_and_update_state_fork(live_api, rewind):
    graph = trip_graph(SessionRewindSaver(rewind))
    config = {"configurable": {"thread_id": "trip-1"}}
    result = graph.invoke({"city": "Oslo", "log": []}, config)
    assert result["log"] == ["plan Oslo", "book Oslo", "confirm Oslo"]

    session = rewind.list_sessions(external_id="trip-1")["results"][0]
    versions = list(rewind.iter_versions(session["id"]))
    assert len(versions) == 5 and all(v["engine"] == "langgraph" and v["engine_version"] for v in versions)
    assert [v["step"] for v in versions][::-1] == ["input -1", "loop 0 → plan", "loop 1 → book",
                                                    "loop 2 → confirm", "loop 3"]

    history = list(graph.get_state_history(config))
    assert [len(snapshot.values.get("log", [])) for snapshot in history] == [3, 2, 1, 0, 0]
    after_plan = next(s for s in history if s.values.get("log") == ["plan Oslo"])
    assert after_plan.next == ("book",)

    # update_state on an older checkpoint: a new branch, visible as a rewind in the timeline.
    forked = graph.update_state(after_plan.config, {"city": "Bergen"})
    resumed = graph.invoke(None, forked)
    assert resumed["log"] == ["plan Oslo", "book Bergen", "confirm Bergen"]
    timeline = list(rewind.iter_versions(session["id"]))
    rewinds = [v for v in timeline if v["kind"] == "rewind"]
    assert len(rewinds) == 1 and rewinds[0]["parent"] == versions[[v["step"] for v in versions].index("loop 1 → book")]["number"]
    assert graph.get_state(config).values["log"] == ["plan Oslo", "book Bergen", "confirm Bergen"]

    # Replay from a checkpoint id (LangGraph's own time travel) re-runs what came after it.
    replayed = graph.invoke(None, after_plan.config)
    assert replayed["log"] == ["plan Oslo", "book Oslo", "confirm Oslo"]
    assert len(list(graph.get_state_history(config))) > len(history)


def trip_rewound_after_plan(rewind, thread_id: str, city: str, reason: str):
    """A trip graph run to the end on `thread_id`, then rewound by an operator (the API, as the dashboard
    does) to its checkpoint after `plan`: (graph, config, session, the rewind's new head)."""
    graph = trip_graph(SessionRewindSaver(rewind))
    config = {"configurable": {"thread_id": thread_id}}
    graph.invoke({"city": city, "log": []}, config)
    session = rewind.list_sessions(external_id=thread_id)["results"][0]
    after_plan = next(v for v in rewind.iter_versions(session["id"]) if v["step"] == "loop 1 → book")
    return graph, config, session, rewind.rewind(session["id"], after_plan["number"], reason=reason)


def test_operator_rewind_is_what_the_graph_resumes_from(live_api, rewind):
    graph, config, _, _ = trip_rewound_after_plan(rewind, "trip-2", "Rome", "booking went wrong")

    state = graph.get_state(config)
    assert state.values["log"] == ["plan Rome"] and state.next == ("book",)
    assert graph.invoke(None, config)["log"] == ["plan Rome", "book Rome", "confirm Rome"]


def test_a_data_fix_after_a_dashboard_rewind_is_what_the_graph_resumes_from(live_api, rewind):
    from sessions_app.models import WorkflowSession
    from snapshots_app.services import snapshot_data_fix

    graph, config, session, head = trip_rewound_after_plan(rewind, "trip-fixed", "Oslo", "booked the wrong city")
    # Staff correct the city at that point (the admin's data fix), then the engine resumes the thread.
    state = head["state"]
    state["checkpoint"]["channel_values"]["city"] = "Bergen"
    snapshot_data_fix(session=WorkflowSession.objects.get(pk=session["id"]), state=state, based_on=head["number"],
                      reason="the city is Bergen", actor_label="ops")

    fixed = graph.get_state(config)
    assert fixed.values == {"city": "Bergen", "log": ["plan Oslo"]} and fixed.next == ("book",)
    assert next(iter(graph.get_state_history(config))).next == ("book",)
    # The write `book` made on the state before the rewind used to come back as the fixed checkpoint's
    # own: it was not run again, and "book Oslo" undid the fix.
    assert graph.invoke(None, config)["log"] == ["plan Oslo", "book Bergen", "confirm Bergen"]


def test_async_graph_and_thread_deletion(live_api):
    async def main() -> tuple[list[str], int, int]:
        async with live_api.aclient() as aclient:
            saver = SessionRewindSaver(aclient=aclient)
            graph = trip_graph(saver)
            config = {"configurable": {"thread_id": "trip-async"}}
            result = await graph.ainvoke({"city": "Lima", "log": []}, config)
            history = [s async for s in graph.aget_state_history(config)]
            await saver.adelete_thread("trip-async")
            remaining = [s async for s in graph.aget_state_history(config)]
            return result["log"], len(history), len(remaining)

    log, history, remaining = asyncio.run(main())
    assert log == ["plan Lima", "book Lima", "confirm Lima"] and history == 5 and remaining == 0


def test_a_thread_another_process_deleted_starts_afresh(live_api, rewind):
    graph = trip_graph(SessionRewindSaver(rewind))  # a long-lived process that knows the thread's sessions
    config = {"configurable": {"thread_id": "trip-deleted"}}
    graph.invoke({"city": "Oslo", "log": []}, config)
    SessionRewindSaver(live_api.client()).delete_thread("trip-deleted")  # a cleanup job elsewhere

    assert graph.get_state(config).values == {}
    # It used to fail with NotFound on every write to the thread, for as long as the process lived.
    assert graph.invoke({"city": "Rome", "log": []}, config)["log"] == ["plan Rome", "book Rome", "confirm Rome"]
    assert len(list(graph.get_state_history(config))) == 5
    assert {s["external_id"] for s in rewind.list_sessions(q="trip-deleted")["results"]} == {
        "trip-deleted", "trip-deleted|writes"}


def test_chat_messages_are_stored_readable_and_come_back_as_messages(live_api, rewind):
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.graph import MessagesState

    def reply(state: MessagesState) -> dict:
        return {"messages": [AIMessage(f"echo: {state['messages'][-1].content}")]}

    graph = chain(MessagesState, ("reply", reply)).compile(checkpointer=SessionRewindSaver(rewind))
    config = {"configurable": {"thread_id": "chat-1"}}
    graph.invoke({"messages": [HumanMessage("hello")]}, config)
    graph.invoke({"messages": [HumanMessage("again")]}, config)

    messages = graph.get_state(config).values["messages"]
    assert [type(m).__name__ for m in messages] == ["HumanMessage", "AIMessage", "HumanMessage", "AIMessage"]
    assert messages[-1].content == "echo: again"

    session = rewind.list_sessions(external_id="chat-1")["results"][0]
    head = rewind.head(session["id"])
    stored = head["state"]["checkpoint"]["channel_values"]["messages"]
    assert stored[-1]["__lc_message__"]["kwargs"]["content"] == "echo: again"
    first_answer = next(v for v in rewind.iter_versions(session["id"]) if v["step"] == "loop 1")
    paths = {c["path"] for c in rewind.diff(session["id"], first_answer["number"], head["number"])["changes"]}
    assert any(path.startswith("/checkpoint/channel_values/messages/3") for path in paths)


class Status(str, Enum):  # noqa: UP042  (as engines write them; a StrEnum is a str subclass too)
    PENDING = "pending"
    DONE = "done"


class Priority(IntEnum):
    LOW = 1
    HIGH = 2


class Ticket(TypedDict):
    status: Status
    priority: Priority
    log: Annotated[list[str], operator.add]


def ticket_graph(saver):
    """triage, ask a human (an interrupt), close: each node branches on the enum members it is given."""
    from langgraph.types import interrupt

    def triage(state: Ticket) -> dict:
        return {"priority": Priority.HIGH, "log": [f"triage pending={state['status'] is Status.PENDING}"]}

    def ask(state: Ticket) -> dict:
        answer = interrupt("close it?")
        pending, high = state["status"] is Status.PENDING, state["priority"] is Priority.HIGH
        return {"status": Status.DONE if pending else state["status"], "log": [f"ask {answer} {pending=} {high=}"]}

    def close(state: Ticket) -> dict:
        return {"log": [f"close done={state['status'] is Status.DONE} high={state['priority'] is Priority.HIGH}"]}

    return chain(Ticket, ("triage", triage), ("ask", ask), ("close", close)).compile(checkpointer=saver)


def test_enum_values_come_back_as_their_members_as_on_langgraphs_own_saver(live_api, rewind):
    """A str Enum's and an IntEnum's members came back plain str and int (stored as JSON, as str and int
    are): after a resume, `status is Status.PENDING` was False and the graph took another branch."""
    from langgraph.types import Command

    config = {"configurable": {"thread_id": "ticket-enums"}}

    def run(first, second) -> tuple:  # the second (another process) reads and resumes the first's thread
        first.invoke({"status": Status.PENDING, "priority": Priority.LOW, "log": []}, config)
        paused = second.get_state(config).values
        done = second.invoke(Command(resume="yes"), config)
        return repr(paused), repr(done), [repr(s.values) for s in second.get_state_history(config)]

    theirs = InMemorySaver()
    expected = run(ticket_graph(theirs), ticket_graph(theirs))
    ours = run(ticket_graph(SessionRewindSaver(rewind)), ticket_graph(SessionRewindSaver(live_api.client())))
    assert "'log': ['triage pending=True', 'ask yes pending=True high=True', 'close done=True high=True']" in ours[1]
    assert ours == expected
    assert "<Priority.HIGH: 2>" in ours[0]


PLAN = {"search": {"query": "hotels in Oslo", "max": 3}, "book": {"room": "double", "nights": 2},
        "email": {"to": "ops", "cc": ["me", {"name": "Ann", "address": "ann@example.com"}]}}


class Itinerary(TypedDict):
    plan: dict
    messages: Annotated[list, add_messages]
    log: Annotated[list[str], operator.add]


def itinerary_graph(saver):
    """draft a plan (and a tool call), ask a human to approve its steps (an interrupt), act on it: each
    node goes through the plan's dicts, and the tool call's arguments, in their order."""
    from langchain_core.messages import AIMessage
    from langgraph.types import interrupt

    def draft(state: Itinerary) -> dict:
        call = {"name": "search", "args": {"query": "hotels", "max": 3, "area": "centre"}, "id": "call-1"}
        return {"plan": json.loads(json.dumps(PLAN)), "messages": [AIMessage("", tool_calls=[call])], "log": ["draft"]}

    def review(state: Itinerary) -> dict:
        answer = interrupt(f"run {' then '.join(state['plan'])}?")
        return {"log": [f"{answer}: " + json.dumps(state["plan"])]}

    def act(state: Itinerary) -> dict:
        return {"log": ["act " + json.dumps(state["messages"][-1].tool_calls[0]["args"])]}

    builder = chain(Itinerary, ("draft", draft), ("review", review), ("act", act))
    return builder.compile(checkpointer=saver)


def test_dict_key_order_is_kept_through_a_resume_and_the_history_as_on_langgraphs_own_saver(live_api, rewind):
    """The server keeps a state's objects with their keys sorted: a plan's steps, and a tool call's
    arguments, came back in alphabetical order after a resume and in the history."""
    from langgraph.types import Command

    config = {"configurable": {"thread_id": "plan-order"}}

    def shape(values: dict) -> tuple:  # (the messages' ids are random: their tool calls' arguments)
        return (json.dumps({key: value for key, value in values.items() if key != "messages"}),
                [json.dumps(m.tool_calls[0]["args"]) for m in values.get("messages", [])])

    def run(first, second) -> tuple:  # the second (another process) reads and resumes the first's thread
        first.invoke({"log": []}, config)
        paused = second.get_state(config)
        done = second.invoke(Command(resume="yes"), config)
        return (paused.tasks[0].interrupts[0].value, shape(paused.values), shape(done),
                [shape(s.values) for s in second.get_state_history(config)])

    theirs = InMemorySaver()
    expected = run(itinerary_graph(theirs), itinerary_graph(theirs))
    ours = run(itinerary_graph(SessionRewindSaver(rewind)), itinerary_graph(SessionRewindSaver(live_api.client())))
    assert json.loads(ours[2][0])["log"] == ["draft", "yes: " + json.dumps(PLAN),
                                             'act {"query": "hotels", "max": 3, "area": "centre"}']
    assert ours == expected
    assert ours[0] == "run search then book then email?"

    # Still readable in the dashboard: each value at its own path, the order beside them.
    session = rewind.list_sessions(external_id="plan-order")["results"][0]
    stored = rewind.head(session["id"])["state"]["checkpoint"]["channel_values"]
    assert stored["plan"]["__lg_keys__"] == ["search", "book", "email"] and stored["plan"]["book"]["room"] == "double"
    assert stored["plan"]["email"]["cc"][1] == {"__lg_keys__": ["name", "address"], "address": "ann@example.com",
                                               "name": "Ann"}
    assert stored["messages"][0]["__lc_message__"]["kwargs"]["tool_calls"][0]["args"]["area"] == "centre"


def trip_with_question(ask) -> StateGraph:
    """plan, then `ask` (a node that asks a human: an interrupt)."""
    return chain(Trip, ("plan", plan), ("ask", ask))


def test_human_in_the_loop_interrupt_survives_a_new_saver(live_api, rewind):
    from langgraph.types import Command, interrupt

    def ask(state: Trip) -> dict:
        answer = interrupt({"question": f"Book {state['city']}?"})
        return {"log": [f"answer {answer}"]}

    builder = trip_with_question(ask)
    config = {"configurable": {"thread_id": "trip-hitl"}}

    paused = builder.compile(checkpointer=SessionRewindSaver(rewind)).invoke({"city": "Kyoto", "log": []}, config)
    assert paused["__interrupt__"][0].value == {"question": "Book Kyoto?"}

    # Another process (a fresh saver, nothing cached) picks the thread up and answers.
    graph = builder.compile(checkpointer=SessionRewindSaver(live_api.client()))
    pending = graph.get_state(config)
    assert pending.next == ("ask",) and pending.tasks[0].interrupts[0].value == {"question": "Book Kyoto?"}
    assert graph.invoke(Command(resume="yes"), config)["log"] == ["plan Kyoto", "answer yes"]


def test_a_run_says_how_its_thread_stands_and_the_session_shows_it(live_api, rewind):
    """A checkpointer is not told that a graph finished or stopped at an interrupt: every LangGraph
    session read `running`, so the list's status filter and the rewind page's warning said nothing."""
    from langgraph.types import Command, interrupt

    def ask(state: Trip) -> dict:
        return {"log": [f"answer {interrupt({'question': 'Book it?'})}"]}

    saver = SessionRewindSaver(rewind)
    graph = trip_with_question(ask).compile(checkpointer=saver)
    config = {"configurable": {"thread_id": "trip-status"}}

    def status() -> str:  # (the thread's session, not its companion "trip-status|writes")
        return next(s["status"] for s in rewind.list_sessions(q="trip-status")["results"] if s["external_id"] == "trip-status")

    assert "__interrupt__" in graph.invoke({"city": "Oslo", "log": []}, config)
    assert status() == "running"  # (what the saver alone leaves)
    saver.set_status("trip-status", "waiting")
    assert status() == "waiting"
    graph.invoke(Command(resume="yes"), config)
    assert graph.get_state(config).next == ()
    saver.set_status("trip-status", "completed")
    assert status() == "completed"

    async def cancel() -> None:  # an async engine's saver, from another process
        async with live_api.aclient() as aclient:
            await SessionRewindSaver(aclient=aclient).aset_status("trip-status", "cancelled")

    asyncio.run(cancel())
    assert status() == "cancelled"
    events = rewind.list_audit_events(action="session.update")["results"]  # each change audited, newest first
    assert [event["details"]["status"]["after"] for event in events][:3] == ["cancelled", "completed", "waiting"]


def test_an_interrupt_asked_again_after_a_rewind_to_its_checkpoint_is_pending(live_api, rewind):
    from langgraph.types import Command, interrupt

    def ask(state: Trip) -> dict:
        return {"log": [f"answer {interrupt('Book it?')}"]}

    builder = trip_with_question(ask)
    config = {"configurable": {"thread_id": "trip-reask"}}
    builder.compile(checkpointer=SessionRewindSaver(rewind)).invoke({"city": "Oslo", "log": []}, config)

    # An operator rewinds to the checkpoint the graph paused at, so the question is asked anew.
    session = rewind.list_sessions(external_id="trip-reask")["results"][0]
    rewind.rewind(session["id"], rewind.head(session["id"])["number"], reason="ask again")
    asked = builder.compile(checkpointer=SessionRewindSaver(live_api.client())).invoke(None, config)
    assert asked["__interrupt__"][0].value == "Book it?"

    # Another process sees the question open (the same writes as before the rewind used to be taken
    # for a retry and not stored again, so the thread showed no interrupt) and answers it.
    graph = builder.compile(checkpointer=SessionRewindSaver(live_api.client()))
    pending = graph.get_state(config)
    assert pending.next == ("ask",) and [i.value for i in pending.tasks[0].interrupts] == ["Book it?"]
    assert graph.invoke(Command(resume="yes"), config)["log"] == ["plan Oslo", "answer yes"]


def trip_with_review() -> StateGraph:
    """plan, then a subgraph "review" whose one node asks for approval (an interrupt)."""
    from langgraph.types import interrupt

    def approve(state: Trip) -> dict:
        return {"log": [f"approved {interrupt('approve?')}"]}

    return chain(Trip, ("plan", plan), ("review", chain(Trip, ("approve", approve)).compile()))


def test_subgraph_checkpoints_live_in_their_own_namespace_session(live_api, rewind):
    from langgraph.types import Command

    outer = trip_with_review()
    config = {"configurable": {"thread_id": "trip-sub"}}

    def run(saver) -> tuple[list[str], list[str]]:
        graph = outer.compile(checkpointer=saver)
        graph.invoke({"city": "Nice", "log": []}, config)
        assert graph.get_state(config, subgraphs=True).tasks[0].state.next == ("approve",)
        log = graph.invoke(Command(resume="ok"), config)["log"]
        # Listed without a namespace: every namespace of the thread, as LangGraph's own savers do.
        namespaces = sorted(t.config["configurable"]["checkpoint_ns"].split(":")[0] for t in saver.list(config))
        return log, namespaces

    ours, theirs = run(SessionRewindSaver(rewind)), run(InMemorySaver())
    assert ours == theirs and "review" in ours[1]

    external_ids = {s["external_id"] for s in rewind.list_sessions(q="trip-sub")["results"]}
    assert "trip-sub" in external_ids and any(e.startswith("trip-sub|review:") for e in external_ids)


def test_an_operator_rewind_before_a_subgraph_runs_it_afresh_as_a_replay_does(live_api, rewind):
    from langgraph.types import Command

    outer = trip_with_review()

    def run(saver, go_back) -> list:
        graph = outer.compile(checkpointer=saver)
        config = {"configurable": {"thread_id": f"trip-sub-rewind-{type(saver).__name__}"}}
        graph.invoke({"city": "Nice", "log": []}, config)
        graph.invoke(Command(resume="first"), config)
        before_review = next(s for s in graph.get_state_history(config) if s.next == ("review",))
        asked = graph.invoke(None, go_back(config, before_review))
        paused = graph.get_state(config, subgraphs=True)
        done = graph.invoke(Command(resume="second"), config)
        subgraph_next = paused.tasks[0].state.next if paused.tasks else ()
        return [[i.value for i in asked.get("__interrupt__", [])], subgraph_next, done["log"]]

    def operator_rewind(config, before_review) -> dict:
        session = rewind.list_sessions(external_id=config["configurable"]["thread_id"])["results"][0]
        version = next(v for v in rewind.iter_versions(session["id"]) if v["step"] == "loop 1 → review")
        rewind.rewind(session["id"], version["number"], reason="review again")
        return config

    replayed = run(InMemorySaver(), lambda config, before_review: before_review.config)
    # The subgraph used to resume from its own latest checkpoint (approved first, nothing asked):
    # the rewind did not reach it.
    ours = run(SessionRewindSaver(rewind), operator_rewind)
    assert ours == replayed and ours[:2] == [["approve?"], ("approve",)] and ours[2][-1] == "approved second"


class Notes(TypedDict):
    letters: list[str]
    seen: list[str]


class NotesMemory(TypedDict):
    letters: list[str]
    seen: Annotated[list[str], operator.add]


def notes_graph(saver):
    """A parent whose `memory` subgraph keeps its own memory across runs (`checkpointer=True`): each
    run it adds the letters given, and hands back all it has seen."""
    inner = chain(NotesMemory, ("remember", lambda state: {"seen": state["letters"]}))
    outer = chain(Notes, ("prep", lambda state: {"letters": state["letters"]}),
                  ("memory", inner.compile(checkpointer=True)))
    return outer.compile(checkpointer=saver)


def _rewind_in_dashboard(rewind, thread_id: str, checkpoint_id: str) -> None:
    session = rewind.list_sessions(external_id=thread_id)["results"][0]
    target = next(v for v in rewind.iter_versions(session["id"], tag=f"cp:{checkpoint_id}") if v["kind"] != "rewind")
    rewind.rewind(session["id"], target["number"], reason="try that run again")


def _two_runs(graph, config) -> list:
    graph.invoke({"letters": ["x", "y"], "seen": []}, config)
    assert graph.invoke({"letters": ["z", "w"], "seen": []}, config)["seen"] == ["x", "y", "z", "w"]
    return list(graph.get_state_history(config))  # newest first


def test_a_dashboard_rewind_brings_a_persistent_subgraphs_memory_back_as_a_replay_does(live_api, rewind):
    """Rewound to the second run's checkpoint before the subgraph (and to the one before `prep`),
    `invoke(None)` used to start the subgraph from nothing (['z', 'w']) and it stayed so on later runs;
    LangGraph's replay from that checkpoint loads the subgraph's memory as it was there."""

    def run(saver, go_back, thread_id: str, before: tuple[str, ...]) -> list:
        graph = notes_graph(saver)
        config = {"configurable": {"thread_id": thread_id}}
        history = _two_runs(graph, config)
        point = next(s for s in history if s.next == before and s.metadata["step"] > 2)  # in the second run
        again = graph.invoke(None, go_back(thread_id, point))["seen"]
        later = graph.invoke({"letters": ["q"], "seen": []}, config)["seen"]
        return [again, later]

    def dashboard(thread_id, point):
        _rewind_in_dashboard(rewind, thread_id, point.config["configurable"]["checkpoint_id"])
        return {"configurable": {"thread_id": thread_id}}

    for before in [("memory",), ("prep",)]:
        replayed = run(InMemorySaver(), lambda thread_id, point: point.config, f"notes-replay-{before[0]}", before)
        ours = run(SessionRewindSaver(rewind), dashboard, f"notes-rewind-{before[0]}", before)
        assert replayed == [["x", "y", "z", "w"], ["x", "y", "z", "w", "q"]]
        assert ours == replayed, before



def test_an_async_graph_gets_its_persistent_subgraphs_memory_back_after_a_dashboard_rewind(live_api, rewind):
    async def main() -> list:
        async with live_api.aclient() as aclient:
            graph = notes_graph(SessionRewindSaver(aclient=aclient))
            config = {"configurable": {"thread_id": "notes-async"}}
            await graph.ainvoke({"letters": ["x", "y"], "seen": []}, config)
            await graph.ainvoke({"letters": ["z", "w"], "seen": []}, config)
            history = [s async for s in graph.aget_state_history(config)]
            point = next(s for s in history if s.next == ("memory",))
            _rewind_in_dashboard(rewind, "notes-async", point.config["configurable"]["checkpoint_id"])
            again = (await graph.ainvoke(None, config))["seen"]
            return [again, (await graph.ainvoke({"letters": ["q"], "seen": []}, config))["seen"]]

    assert asyncio.run(main()) == [["x", "y", "z", "w"], ["x", "y", "z", "w", "q"]]

def test_new_input_after_a_dashboard_rewind_meets_the_subgraph_memory_of_that_point(live_api, rewind):
    """Rewound to the end of the first run, a new run used to meet the memory of the run it abandoned
    (['x', 'y', 'z', 'w', 'q']): the rewind brings the subgraph's memory back to ['x', 'y'], as an
    `invoke(None)` from there (a replay in LangGraph) sees it. (LangGraph's own savers, given new input
    with that checkpoint's id, keep the newest memory: a rewind in the dashboard rewinds all of the thread.)"""
    graph = notes_graph(SessionRewindSaver(rewind))
    config = {"configurable": {"thread_id": "notes-new-input"}}
    history = _two_runs(graph, config)
    first_done = next(s for s in history if s.next == () and s.metadata["step"] == 2)
    _rewind_in_dashboard(rewind, "notes-new-input", first_done.config["configurable"]["checkpoint_id"])
    assert graph.invoke({"letters": ["q"], "seen": []}, config)["seen"] == ["x", "y", "q"]
    assert graph.invoke({"letters": ["r"], "seen": []}, config)["seen"] == ["x", "y", "q", "r"]
    # The subgraph's own timeline shows the branch: back to its first run's memory, then q and r.
    memory = next(t for t in graph.checkpointer.list({"configurable": {**config["configurable"], "checkpoint_ns": "memory"}}))
    assert memory.checkpoint["channel_values"]["seen"] == ["x", "y", "q", "r"]
    # Rewound again, to the end of the q run (on the new branch), then to the first run's end again.
    q_done = next(s for s in graph.get_state_history(config) if s.next == () and s.values["seen"] == ["x", "y", "q"])
    _rewind_in_dashboard(rewind, "notes-new-input", q_done.config["configurable"]["checkpoint_id"])
    assert graph.invoke({"letters": ["s"], "seen": []}, config)["seen"] == ["x", "y", "q", "s"]
    _rewind_in_dashboard(rewind, "notes-new-input", first_done.config["configurable"]["checkpoint_id"])
    assert graph.invoke({"letters": ["t"], "seen": []}, config)["seen"] == ["x", "y", "t"]
    # A rewind to that rewind (itself restoring the first run's end).
    session = rewind.list_sessions(external_id="notes-new-input")["results"][0]
    last_rewind = next(v for v in rewind.iter_versions(session["id"]) if v["kind"] == "rewind")
    rewind.rewind(session["id"], last_rewind["number"], reason="back to that rewind")
    assert graph.invoke({"letters": ["u"], "seen": []}, config)["seen"] == ["x", "y", "u"]



def test_a_dashboard_rewind_to_a_question_a_persistent_subgraph_asked_asks_it_again_as_a_replay_does(live_api, rewind):
    """The second run's review subgraph (its memory kept across runs) asks, is rewound in the dashboard to
    the checkpoint the thread waited at, and is answered: the question comes again and the answer lands
    on the first run's memory, as on LangGraph's replay from there."""
    from langgraph.types import Command, interrupt

    class Review(TypedDict):
        city: str
        answers: Annotated[list[str], operator.add]

    def approve(state: Review) -> dict:
        return {"answers": [f"{state['city']} {interrupt('approve?')}"]}

    class Trips(TypedDict):
        city: str
        answers: list[str]

    outer = chain(Trips, ("plan", lambda state: {"city": state["city"]}),
                  ("review", chain(Review, ("approve", approve)).compile(checkpointer=True)))

    def run(saver, go_back, thread_id: str) -> list:
        graph = outer.compile(checkpointer=saver)
        config = {"configurable": {"thread_id": thread_id}}
        graph.invoke({"city": "Nice", "answers": []}, config)
        graph.invoke(Command(resume="yes"), config)
        graph.invoke({"city": "Oslo", "answers": []}, config)
        graph.invoke(Command(resume="no"), config)
        history = list(graph.get_state_history(config))
        waited = next(s for s in history if s.next == ("review",) and s.metadata["step"] > 3)
        asked = graph.invoke(None, go_back(thread_id, waited))
        paused = graph.get_state(config, subgraphs=True)
        done = graph.invoke(Command(resume="maybe"), config)
        inner_asks = [i.value for task in paused.tasks[0].state.tasks for i in task.interrupts]
        return [[i.value for i in asked.get("__interrupt__", [])], paused.tasks[0].state.next, inner_asks, done["answers"]]

    def dashboard(thread_id, point):
        _rewind_in_dashboard(rewind, thread_id, point.config["configurable"]["checkpoint_id"])
        return {"configurable": {"thread_id": thread_id}}

    replayed = run(InMemorySaver(), lambda thread_id, point: point.config, "review-replay")
    ours = run(SessionRewindSaver(rewind), dashboard, "review-rewind")
    assert replayed == [["approve?"], ("approve",), ["approve?"], ["Nice yes", "Oslo maybe"]]
    assert ours == replayed


def test_prune_after_a_dashboard_rewind_keeps_the_persistent_subgraphs_memory_of_that_point(live_api, rewind):
    """`prune` keeps each namespace's latest checkpoint: for the subgraph, the one it reads after the
    thread's rewind (it used to keep the memory of the branch the rewind left, ['x', 'y', 'z', 'w'])."""
    saver = SessionRewindSaver(rewind)
    graph = notes_graph(saver)
    config = {"configurable": {"thread_id": "notes-prune"}}
    history = _two_runs(graph, config)
    first_done = next(s for s in history if s.next == () and s.metadata["step"] == 2)
    _rewind_in_dashboard(rewind, "notes-prune", first_done.config["configurable"]["checkpoint_id"])
    saver.prune(["notes-prune"])
    assert graph.invoke({"letters": ["q"], "seen": []}, config)["seen"] == ["x", "y", "q"]

def test_thread_ids_up_to_the_external_id_limit(live_api, rewind):
    graph = trip_graph(SessionRewindSaver(rewind))
    config = {"configurable": {"thread_id": "t" * 255}}
    assert graph.invoke({"city": "Riga", "log": []}, config)["log"][-1] == "confirm Riga"
    assert len(list(graph.get_state_history(config))) == 5
    writes_session = next(s for s in rewind.iter_sessions(tag="langgraph-writes") if s["external_id"].startswith("t" * 200))
    assert len(writes_session["external_id"]) == 255

    # Longer ones too (stored under a shortened id), through to deletion, whose audit reason is cut.
    saver = SessionRewindSaver(rewind)
    config = {"configurable": {"thread_id": "u" * 1990}}
    trip_graph(saver).invoke({"city": "Oslo", "log": []}, config)
    saver.delete_thread("u" * 1990)
    assert list(trip_graph(saver).get_state_history(config)) == []


def test_a_thread_id_with_a_trailing_space_is_found_again_by_a_new_process(live_api, rewind):
    config = {"configurable": {"thread_id": "trip-padded "}}
    trip_graph(SessionRewindSaver(rewind)).invoke({"city": "Oslo", "log": []}, config)
    trip_graph(SessionRewindSaver(rewind)).invoke({"city": "Rome", "log": []}, {"configurable": {"thread_id": "trip-padded"}})
    # The server stored the id stripped: an engine restarted (a new saver) found no checkpoint for its
    # thread and started it afresh, and "trip-padded" wrote into the same session.
    restarted = trip_graph(SessionRewindSaver(live_api.client()))
    assert restarted.get_state(config).values["log"] == ["plan Oslo", "book Oslo", "confirm Oslo"]
    assert len(list(restarted.get_state_history(config))) == 5


def ask_to_book(state: Trip) -> dict:
    from langgraph.types import interrupt

    answer = interrupt({"question": f"Book {state['city']}?"})
    return {"log": [f"answer {answer}"]}


def test_a_thread_id_holding_a_bar_is_a_thread_of_its_own(live_api, rewind):
    from langgraph.types import Command

    # A bar joins a thread id to its namespace, and to "writes", in the sessions' external ids: thread
    # "trip-bar|writes" was thread "trip-bar"'s pending writes session, and writing to it took them over.
    paused = {"configurable": {"thread_id": "trip-bar"}}
    other = {"configurable": {"thread_id": "trip-bar|writes"}}
    trip_with_question(ask_to_book).compile(checkpointer=SessionRewindSaver(rewind)).invoke({"city": "Kyoto", "log": []}, paused)
    assert trip_graph(SessionRewindSaver(rewind)).invoke({"city": "Oslo", "log": []}, other)["log"][-1] == "confirm Oslo"

    graph = trip_with_question(ask_to_book).compile(checkpointer=SessionRewindSaver(live_api.client()))
    assert graph.get_state(paused).tasks[0].interrupts[0].value == {"question": "Book Kyoto?"}
    history = list(trip_graph(SessionRewindSaver(live_api.client())).get_state_history(other))
    assert len(history) == 5 and history[0].values["log"] == ["plan Oslo", "book Oslo", "confirm Oslo"]
    SessionRewindSaver(live_api.client()).delete_thread("trip-bar|writes")
    assert graph.invoke(Command(resume="yes"), paused)["log"] == ["plan Kyoto", "answer yes"]
    assert {s["external_id"] for s in rewind.list_sessions(q="trip-bar")["results"]} == {"trip-bar", "trip-bar|writes"}


def test_a_thread_id_holding_a_bar_keeps_the_sessions_an_older_client_named(live_api, rewind):
    from langgraph.types import Command

    from sessions_app.models import WorkflowSession

    # Before the bar in a thread id was escaped, thread "trip|old" was stored in sessions "trip|old"
    # and "trip|old|writes": a new client reads and writes those, and makes no others.
    config = {"configurable": {"thread_id": "trip|old"}}
    trip_with_question(ask_to_book).compile(checkpointer=SessionRewindSaver(rewind)).invoke({"city": "Kyoto", "log": []}, config)
    for session in WorkflowSession.objects.filter(project=live_api.project, external_id__startswith="trip%7Cold"):
        session.external_id = session.external_id.replace("%7C", "|")
        session.save(update_fields=["external_id"])

    saver = SessionRewindSaver(live_api.client())
    graph = trip_with_question(ask_to_book).compile(checkpointer=saver)
    assert graph.get_state(config).tasks[0].interrupts[0].value == {"question": "Book Kyoto?"}
    assert graph.invoke(Command(resume="yes"), config)["log"] == ["plan Kyoto", "answer yes"]
    assert len(list(graph.get_state_history(config))) == 4  # input, start, plan, ask: none lost or split off
    assert {s["external_id"] for s in rewind.list_sessions(q="trip")["results"]} == {"trip|old", "trip|old|writes"}
    saver.delete_thread("trip|old")
    assert rewind.list_sessions(q="trip")["results"] == []


def test_a_thread_id_holding_nul_is_a_thread_found_again_by_a_new_process(live_api, rewind):
    """LangGraph takes any string for a thread id; a NUL in one was a 400 (no external id, metadata
    or audit reason may hold one) at the first checkpoint."""
    from langgraph.types import Command

    thread_id = "trip\x00nul"
    config = {"configurable": {"thread_id": thread_id}}
    paused = trip_with_question(ask_to_book).compile(checkpointer=SessionRewindSaver(rewind)).invoke(
        {"city": "Kyoto", "log": []}, config)
    assert paused["__interrupt__"][0].value == {"question": "Book Kyoto?"}

    saver = SessionRewindSaver(live_api.client())  # another process: found by its (escaped) external id
    graph = trip_with_question(ask_to_book).compile(checkpointer=saver)
    assert graph.get_state(config).tasks[0].interrupts[0].value == {"question": "Book Kyoto?"}
    assert graph.invoke(Command(resume="yes"), config)["log"] == ["plan Kyoto", "answer yes"]
    assert len(list(graph.get_state_history(config))) == 4
    assert {t.config["configurable"]["thread_id"] for t in saver.list(None)} == {thread_id}
    assert {s["external_id"] for s in rewind.list_sessions(q="trip")["results"]} == {"trip%00nul", "trip%00nul|writes"}
    assert graph.get_state({"configurable": {"thread_id": "trip"}}).values == {}  # not thread "trip"'s

    saver.copy_thread(thread_id, "trip\x00copy")
    assert len(list(graph.get_state_history({"configurable": {"thread_id": "trip\x00copy"}}))) == 4
    for thread in (thread_id, "trip\x00copy"):
        SessionRewindSaver(live_api.client()).delete_thread(thread)
    assert rewind.list_sessions(q="trip")["results"] == []


def test_list_without_a_thread_searches_every_thread(live_api, rewind):
    saver = SessionRewindSaver(rewind)
    graph = trip_graph(saver)
    for city in ("Oslo", "Rome"):
        graph.invoke({"city": city, "log": []}, {"configurable": {"thread_id": f"search-{city}"}})
    finished = list(saver.list(None, filter={"step": 3}))
    assert sorted(t.config["configurable"]["thread_id"] for t in finished) == ["search-Oslo", "search-Rome"]
    assert len(list(saver.list(None, limit=3))) == 3


def test_list_without_a_thread_finds_a_thread_written_while_its_pages_are_read(live_api, monkeypatch):
    import httpx
    from session_rewind_client import langgraph as saver_module

    monkeypatch.setattr(saver_module, "PAGE", 2)  # pages of two sessions: four threads take several
    engine = trip_graph(SessionRewindSaver(live_api.client()))
    threads = [f"walked-{n}" for n in range(4)]
    for thread in threads:
        engine.invoke({"city": thread, "log": []}, {"configurable": {"thread_id": thread}})

    def engine_writes_the_oldest_thread(response: httpx.Response) -> None:
        # Once the searching process has read its first page of threads, an engine runs the oldest again.
        if response.request.url.path.endswith("/sessions/") and not written:
            written.append(engine.invoke({"city": "again", "log": []}, {"configurable": {"thread_id": threads[0]}}))

    written: list = []
    saver = SessionRewindSaver(live_api.hooked_client(on_response=engine_writes_the_oldest_thread))
    # In the list's default order (activity), the thread written meanwhile moved above the cursor: missed.
    assert {t.config["configurable"]["thread_id"] for t in saver.list(None)} == set(threads)
    assert written


def test_finished_tasks_are_not_run_again_after_retention_when_a_paused_graph_resumes(live_api, rewind):
    """Fan out to three tasks, one of which pauses; the other two's writes must outlive retention."""
    from langgraph.types import Command, interrupt

    from snapshots_app.compaction import compaction_run, retention_policy_set

    ran: list[str] = []

    def task(name: str, pause: bool = False):
        def run(state: Trip) -> dict:
            ran.append(name)
            if pause:
                interrupt("go on?")
            return {"log": [name]}
        return run

    builder = StateGraph(Trip)
    builder.add_node("a", task("a"))
    for name in ("b1", "b2", "b3"):
        builder.add_node(name, task(name, pause=name == "b3"))
        builder.add_edge("a", name)
        builder.add_edge(name, END)
    builder.add_edge(START, "a")
    graph = builder.compile(checkpointer=SessionRewindSaver(rewind))
    config = {"configurable": {"thread_id": "fan-out"}}
    graph.invoke({"city": "Oslo", "log": []}, config)
    assert sorted(ran) == ["a", "b1", "b2", "b3"]

    retention_policy_set(project=live_api.project, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    compaction_run(project=live_api.project)
    ran.clear()
    graph.invoke(Command(resume="yes"), config)
    assert ran == ["b3"]


def test_writing_to_an_archived_thread_says_so(live_api, rewind):
    import pytest
    from session_rewind_client import ConflictError

    graph = trip_graph(SessionRewindSaver(rewind))
    config = {"configurable": {"thread_id": "trip-archived"}}
    graph.invoke({"city": "Lima", "log": []}, config)
    session = rewind.list_sessions(external_id="trip-archived")["results"][0]
    rewind.archive_session(session["id"])
    with pytest.raises(ConflictError) as excinfo:
        graph.invoke({"city": "Lima", "log": []}, config)
    assert excinfo.value.code == "session_archived"


def test_a_fork_made_in_session_rewind_is_its_own_thread(live_api, rewind):
    # A fork copies its source's tags and metadata: the source's delete_thread must not take the
    # fork with it, and the fork, once LangGraph runs it, is a thread of its own.
    saver = SessionRewindSaver(live_api.client())
    graph = trip_graph(saver)
    config = {"configurable": {"thread_id": "trip-forked"}}
    graph.invoke({"city": "Oslo", "log": []}, config)
    source = rewind.list_sessions(external_id="trip-forked")["results"][0]
    after_plan = next(v for v in rewind.iter_versions(source["id"]) if v["step"].startswith("loop 1"))
    rewind.fork(source["id"], after_plan["number"], reason="try Bergen", external_id="trip-forked-2")

    fork_config = {"configurable": {"thread_id": "trip-forked-2"}}
    assert graph.get_state(fork_config).next == ("book",)
    listed = {t.config["configurable"]["thread_id"] for t in saver.list(None)}
    assert {"trip-forked", "trip-forked-2"} <= listed

    saver.delete_thread("trip-forked")
    assert graph.get_state(fork_config).values["log"] == ["plan Oslo"]
    assert graph.invoke(None, fork_config)["log"] == ["plan Oslo", "book Oslo", "confirm Oslo"]

    saver.delete_thread("trip-forked-2")
    assert rewind.list_sessions(q="trip-forked")["results"] == []


class Fan(TypedDict):
    items: list[str]
    log: Annotated[list[str], operator.add]


def test_the_timeline_names_the_nodes_sends_and_joins_run_next(live_api, rewind):
    """A step's name says what runs next: branches, each Send (counted) and a join once complete."""
    from langgraph.types import Send

    graph = StateGraph(Fan)
    graph.add_node("start", lambda state: {"log": ["start"]})
    graph.add_node("worker", lambda state: {"log": [f"worker {state['items'][0]}"]})
    graph.add_node("left", lambda state: {"log": ["left"]})
    graph.add_node("right", lambda state: {"log": ["right"]})
    graph.add_node("join", lambda state: {"log": ["join"]})
    graph.add_edge(START, "start")
    graph.add_conditional_edges("start", lambda state: [Send("worker", {"items": [i], "log": []})
                                                        for i in state["items"]], ["worker"])
    graph.add_edge("start", "left")
    graph.add_edge("start", "right")
    graph.add_edge(["left", "right"], "join")
    graph.add_edge("join", END)
    graph.add_edge("worker", END)
    app = graph.compile(checkpointer=SessionRewindSaver(rewind))
    app.invoke({"items": ["a", "b", "c"], "log": []}, {"configurable": {"thread_id": "fan-out"}})
    session = rewind.list_sessions(external_id="fan-out")["results"][0]
    steps = [version["step"] for version in sorted(rewind.iter_versions(session["id"]), key=lambda v: v["number"])]
    assert steps == ["input -1", "loop 0 → start", "loop 1 → left, right, worker x3", "loop 2 → join",
                     "loop 3"]


def test_an_async_saver_serves_one_asyncio_run_after_another(live_api):
    # An engine that runs each job under its own asyncio.run with one long-lived saver used to get
    # "Event loop is closed" from the second job on.
    saver = SessionRewindSaver(aclient=live_api.aclient())
    graph = trip_graph(saver)
    for city in ("Oslo", "Rome"):
        config = {"configurable": {"thread_id": f"loops-{city}"}}
        assert asyncio.run(graph.ainvoke({"city": city, "log": []}, config))["log"][-1] == f"confirm {city}"
    assert asyncio.run(graph.aget_state(config)).values["city"] == "Rome"


def test_a_long_lived_saver_remembers_a_bounded_number_of_threads_at_no_cost_to_the_running_one(live_api):
    # The session-id cache grew with every thread a process ever saw. Bounded, the thread being run
    # costs the same requests as with a cache big enough for every thread.
    def run(saver: SessionRewindSaver, sent: list[str]) -> int:
        graph = trip_graph(saver)
        for n in range(6):
            graph.invoke({"city": f"city-{n}", "log": []}, {"configurable": {"thread_id": f"many-{id(saver)}-{n}"}})
        sent.clear()
        graph.invoke({"city": "again", "log": []}, {"configurable": {"thread_id": f"many-{id(saver)}-5"}})
        return len(sent)

    small_client, small_sent = live_api.counted_client()
    small = SessionRewindSaver(small_client, session_cache_size=4)
    big_client, big_sent = live_api.counted_client()
    big = SessionRewindSaver(big_client)
    assert run(small, small_sent) == run(big, big_sent)
    assert len(small._sessions) <= 4 and len(small._heads) <= 4  # 12 sessions were seen (6 threads, their writes)

    # A thread forgotten meanwhile still resumes where it was.
    state = trip_graph(small).get_state({"configurable": {"thread_id": f"many-{id(small)}-0"}})
    assert state.values["log"] == ["plan city-0", "book city-0", "confirm city-0"]


class Talk(TypedDict):
    turns: int
    log: Annotated[list[str], operator.add]


def talk_graph(saver):
    """`turn` until the log holds `turns` lines, then `ask` a human (an interrupt), then end."""
    from langgraph.types import interrupt

    def turn(state: Talk) -> dict:
        return {"log": [f"turn {len(state['log'])}"]}

    def ask(state: Talk) -> dict:
        return {"log": [f"answer {interrupt('go on?')}"]}

    builder = StateGraph(Talk)
    builder.add_node("turn", turn)
    builder.add_node("ask", ask)
    builder.add_edge(START, "turn")
    builder.add_conditional_edges("turn", lambda state: "turn" if len(state["log"]) < state["turns"] else "ask",
                                  ["turn", "ask"])
    builder.add_edge("ask", END)
    return builder.compile(checkpointer=saver)


def history_shape(history) -> list:
    """What a user reads in a history, without the savers' own ids: values, what runs next, each task's
    interrupts and result (from the checkpoint's pending writes), and the parent as a position."""
    position = {snapshot.config["configurable"]["checkpoint_id"]: n for n, snapshot in enumerate(history)}
    return [
        (snapshot.values, snapshot.next, snapshot.metadata.get("source"), snapshot.metadata.get("step"),
         position.get(((snapshot.parent_config or {}).get("configurable") or {}).get("checkpoint_id")),
         [(task.name, [i.value for i in task.interrupts], task.result) for task in snapshot.tasks])
        for snapshot in history
    ]


def test_a_long_history_is_read_in_a_few_requests_per_page_and_matches_langgraphs_own_saver(live_api):
    from langgraph.types import Command

    turns = 100
    config = {"configurable": {"thread_id": "long-talk"}, "recursion_limit": 300}

    def run(saver) -> None:
        graph = talk_graph(saver)
        graph.invoke({"turns": turns, "log": []}, config)  # pauses at the question: pending writes
        halfway = next(s for s in graph.get_state_history(config) if len(s.values["log"]) == turns // 2)
        forked = graph.update_state(halfway.config, {"turns": turns // 2 + 5})  # a branch (a rewind here)
        graph.invoke(None, forked)
        graph.invoke(Command(resume="yes"), config)

    theirs = InMemorySaver()
    run(theirs)
    run(SessionRewindSaver(live_api.client()))
    expected = history_shape(list(talk_graph(theirs).get_state_history(config)))
    assert len(expected) > 100 and expected[0][0]["log"][-1] == "answer yes"
    pages = -(-len(expected) // 50)  # the server's pages of states hold 50

    # Another process reads the history: it used to cost two requests per checkpoint (its state, then
    # its writes), ~230 here and seconds of waiting on a long thread.
    client, sent = live_api.counted_client()
    saver = SessionRewindSaver(client)
    assert history_shape(list(talk_graph(saver).get_state_history(config))) == expected
    assert len(sent) <= 5 * pages, sent
    assert not any("/versions/" in request and not request.endswith("/versions/") for request in sent), sent

    async def read_async() -> tuple[list, list[str]]:
        aclient, asent = live_api.counted_aclient()
        async with aclient:
            history = [s async for s in talk_graph(SessionRewindSaver(aclient=aclient)).aget_state_history(config)]
        return history_shape(history), asent

    ahistory, asent = asyncio.run(read_async())
    assert ahistory == expected and len(asent) <= 5 * pages, asent

    # A caller that reads only the newest checkpoints does not page through the rest.
    root = {"configurable": {"thread_id": "long-talk", "checkpoint_ns": ""}}
    client, sent = live_api.counted_client()
    newest = next(SessionRewindSaver(client).list(root))
    assert newest.checkpoint["channel_values"]["log"][-1] == "answer yes" and len(sent) <= 4, sent
    client, sent = live_api.counted_client()
    first = list(SessionRewindSaver(client).list(root, limit=5))
    assert len(first) == 5 and len(sent) <= 10, sent
    client, sent = live_api.counted_client()
    assert [t.config for t in SessionRewindSaver(client).list(root, before=first[2].config, limit=2)] == [
        t.config for t in first[3:5]]
    assert len(sent) <= 6, sent


def test_a_listed_checkpoint_keeps_the_writes_made_before_it_was_rewound_to(live_api, rewind):
    """Ask, an operator rewinds to the question, it is asked again and answered, and the talk goes on:
    in the history the question's checkpoint still shows the first asking only (later writes belong
    to the rewind), wherever it falls in the listing and however the listing reads its writes."""
    from langgraph.types import Command

    graph = talk_graph(SessionRewindSaver(rewind))
    config = {"configurable": {"thread_id": "talk-rewound"}}
    graph.invoke({"turns": 1, "log": []}, config)
    session = rewind.list_sessions(external_id="talk-rewound")["results"][0]
    question = rewind.head(session["id"])
    rewind.rewind(session["id"], question["number"], reason="ask again")
    assert graph.invoke(None, config)["__interrupt__"][0].value == "go on?"
    graph.invoke(Command(resume="yes"), config)
    graph.update_state(config, {"turns": 6}, as_node="turn")
    graph.invoke(None, config)  # five more turns, then the question again
    graph.invoke(Command(resume="done"), config)

    root = {"configurable": {"thread_id": "talk-rewound", "checkpoint_ns": ""}}
    question_id = question["state"]["checkpoint"]["id"]
    fresh = SessionRewindSaver(live_api.client())
    listed = list(fresh.list(root))
    asked = next(t for t in listed if t.config["configurable"]["checkpoint_id"] == question_id)
    assert listed.index(asked) > 5  # past the first checkpoints, whose writes are read one by one
    assert [(channel, [i.value for i in value]) for _, channel, value in asked.pending_writes] == [
        ("__interrupt__", ["go on?"])]
    for n, listed_tuple in enumerate(listed):
        alone = fresh.get_tuple(listed_tuple.config)
        assert listed_tuple.pending_writes == alone.pending_writes, n
        assert [t.pending_writes for t in fresh.list(root, limit=n + 1)][-1] == listed_tuple.pending_writes, n
    assert [t.pending_writes for t in SessionRewindSaver(live_api.client()).list(asked.config)] == [
        asked.pending_writes]


def state_shape(snapshot) -> tuple:
    """What a user reads in one state: values, what runs next, each task's interrupts and result."""
    return (snapshot.values, snapshot.next, snapshot.metadata.get("source"), snapshot.metadata.get("step"),
            [(task.name, [i.value for i in task.interrupts], task.result) for task in snapshot.tasks])


def test_a_checkpoint_asked_for_by_id_is_read_in_one_request_and_matches_langgraphs_own_saver(live_api):
    config = {"configurable": {"thread_id": "by-id"}}
    theirs = talk_graph(InMemorySaver())
    theirs.invoke({"turns": 4, "log": []}, config)  # paused at the question: the newest checkpoint has writes
    ours = talk_graph(SessionRewindSaver(live_api.client()))
    ours.invoke({"turns": 4, "log": []}, config)
    expected = [state_shape(s) for s in theirs.get_state_history(config)]
    configs = [s.config for s in ours.get_state_history(config)]
    assert len(configs) == len(expected) == 6

    for n, checkpoint in enumerate(configs):
        client, sent = live_api.counted_client()
        assert state_shape(talk_graph(SessionRewindSaver(client)).get_state(checkpoint)) == expected[n], n
        # The thread's session, the checkpoint with its state, its rewinds, the writes session, its
        # writes: the checkpoint used to take two (its version number by its tag, then its state).
        assert len(sent) == 5, sent
        assert not any(re.search(r"/versions/\d+/$", request) for request in sent), sent

    # A saver that knows the thread's sessions: the checkpoint, its rewinds and its writes.
    client, sent = live_api.counted_client()
    graph = talk_graph(SessionRewindSaver(client))
    graph.get_state(configs[0])
    sent.clear()
    assert state_shape(graph.get_state(configs[3])) == expected[3] and len(sent) == 3, sent


def test_a_checkpoint_without_writes_asked_for_by_id_spends_no_request_on_rewinds(live_api, rewind):
    from langgraph.types import Command

    config = {"configurable": {"thread_id": "by-id-done"}}
    theirs = talk_graph(InMemorySaver())
    ours = talk_graph(SessionRewindSaver(live_api.client()))
    for graph in (theirs, ours):
        graph.invoke({"turns": 3, "log": []}, config)
        graph.invoke(Command(resume="yes"), config)  # finished: its last checkpoint has no pending writes
    final = ours.get_state(config).config
    session = rewind.list_sessions(external_id="by-id-done")["results"][0]
    rewind.rewind(session["id"], session["head"] - 1, reason="look at the question again")
    rewind.rewind(session["id"], session["head"], reason="back to the answer")  # a rewind to `final`

    client, sent = live_api.counted_client()
    assert state_shape(talk_graph(SessionRewindSaver(client)).get_state(final)) == state_shape(theirs.get_state(config))
    # The thread's session, the checkpoint with its state, the writes session, its writes (none): its
    # rewinds, which only say which of its writes are its own, used to cost one more.
    assert len(sent) == 4, sent


def test_copy_thread_goes_a_page_at_a_time_and_the_copy_reads_as_its_source(live_api, rewind):
    from langgraph.types import Command

    turns = 60
    config = {"configurable": {"thread_id": "copy-source"}, "recursion_limit": 200}
    graph = talk_graph(SessionRewindSaver(live_api.client()))
    graph.invoke({"turns": turns, "log": []}, config)
    halfway = next(s for s in graph.get_state_history(config) if len(s.values["log"]) == turns // 2)
    graph.invoke(None, graph.update_state(halfway.config, {"turns": turns // 2 + 5}))  # a branch: a rewind
    graph.invoke(Command(resume="yes"), config)
    graph.invoke({"turns": turns // 2 + 7, "log": []}, config)  # paused at the question again: pending writes
    source = history_shape(list(graph.get_state_history(config)))
    sessions = [rewind.list_sessions(external_id=external_id)["results"][0]
                for external_id in ("copy-source", "copy-source|writes")]
    assert len(source) > 50 and all(session["head"] > 50 for session in sessions)

    client, sent = live_api.counted_client()
    SessionRewindSaver(client).copy_thread("copy-source", "copy-target")
    target = {"configurable": {"thread_id": "copy-target"}}
    assert history_shape(list(talk_graph(SessionRewindSaver(live_api.client())).get_state_history(target))) == source
    # The thread's sessions, then for each (checkpoints, writes) the target session and its versions in
    # pages of 50 with their states, each page recorded in one batch: 11 requests here. It used to be a
    # GET and a POST per version (~290).
    pages = sum(-(-session["head"] // 50) for session in sessions)
    assert len(sent) == 1 + 2 + 2 * pages, sent
    assert not any(re.search(r"/versions/\d+/$", request) for request in sent), sent

    # Onto itself: the walk stops at the versions the thread had, and the thread reads the same.
    SessionRewindSaver(live_api.client()).copy_thread("copy-target", "copy-target")
    assert history_shape(list(talk_graph(SessionRewindSaver(live_api.client())).get_state_history(target))) == source


def test_a_copy_of_a_thread_rewound_in_the_dashboard_resumes_where_its_source_does(live_api, rewind):
    """Rewinds are not copied as checkpoints: a thread whose head was a dashboard rewind was copied with
    the abandoned branch's last checkpoint as its head, so the copy resumed from the end of the run the
    operator had sent the source back from."""
    config = {"configurable": {"thread_id": "copy-rewound"}}
    graph = talk_graph(SessionRewindSaver(live_api.client()))
    graph.invoke({"turns": 6, "log": []}, config)  # paused at the question after six turns
    middle = next(s for s in graph.get_state_history(config) if len(s.values["log"]) == 3)
    _rewind_in_dashboard(rewind, "copy-rewound", middle.config["configurable"]["checkpoint_id"])
    source = talk_graph(SessionRewindSaver(live_api.client())).get_state(config)
    assert source.values["log"] == ["turn 0", "turn 1", "turn 2"]

    SessionRewindSaver(live_api.client()).copy_thread("copy-rewound", "copy-rewound-2")
    target = {"configurable": {"thread_id": "copy-rewound-2"}}
    copy = talk_graph(SessionRewindSaver(live_api.client()))
    assert (copy.get_state(target).values, copy.get_state(target).next) == (source.values, source.next)
    assert copy.invoke(None, target)["log"][:4] == ["turn 0", "turn 1", "turn 2", "turn 3"]


def test_a_copy_of_a_thread_whose_head_staff_fixed_resumes_as_its_source_does(live_api, rewind):
    """A data fix is copied as a plain checkpoint (the API records steps), which read the writes made
    for it before the fix as its own: the copy held the question its source's fix had withdrawn."""
    from sessions_app.models import WorkflowSession
    from snapshots_app.services import snapshot_data_fix

    config = {"configurable": {"thread_id": "copy-fixed"}}
    trip_with_question(ask_to_book).compile(checkpointer=SessionRewindSaver(rewind)).invoke({"city": "Kyoto", "log": []}, config)
    session = rewind.list_sessions(external_id="copy-fixed")["results"][0]
    head = rewind.head(session["id"])
    state = head["state"]
    state["checkpoint"]["channel_values"]["city"] = "Bergen"
    snapshot_data_fix(session=WorkflowSession.objects.get(pk=session["id"]), state=state, based_on=head["number"],
                      reason="the city is Bergen", actor_label="ops")
    graph = trip_with_question(ask_to_book).compile(checkpointer=SessionRewindSaver(live_api.client()))
    source = graph.get_state(config)
    assert source.values["city"] == "Bergen" and source.next == ("ask",) and source.tasks[0].interrupts == ()

    SessionRewindSaver(live_api.client()).copy_thread("copy-fixed", "copy-fixed-2")
    target = {"configurable": {"thread_id": "copy-fixed-2"}}
    copy = graph.get_state(target)
    assert (copy.values, copy.next, copy.tasks[0].interrupts) == (source.values, source.next, ())
    # Both ask again, about the city as fixed.
    for thread in (config, target):
        assert graph.invoke(None, thread)["__interrupt__"][0].value == {"question": "Book Bergen?"}


def test_a_copy_a_server_finds_too_large_for_one_request_goes_in_smaller_batches(live_api, settings):
    config = {"configurable": {"thread_id": "copy-small-bodies"}}
    graph = talk_graph(SessionRewindSaver(live_api.client()))
    graph.invoke({"turns": 12, "log": []}, config)
    source = history_shape(list(graph.get_state_history(config)))

    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 6000  # a server that takes small bodies only (REQUEST_MAX_BYTES)
    client, sent = live_api.counted_client()
    SessionRewindSaver(client).copy_thread("copy-small-bodies", "copy-small-target")
    target = {"configurable": {"thread_id": "copy-small-target"}}
    assert history_shape(list(talk_graph(SessionRewindSaver(live_api.client())).get_state_history(target))) == source
    assert len([request for request in sent if request.endswith("/batch/")]) > 2, sent


def test_prune_keep_latest_costs_the_same_however_many_writes_the_latest_checkpoint_has(live_api):
    from langgraph.checkpoint.conformance.test_utils import generate_checkpoint

    saver = SessionRewindSaver(live_api.client())
    config = {"configurable": {"thread_id": "prune-many", "checkpoint_ns": ""}}
    for step in range(3):
        config = saver.put(config, generate_checkpoint(), {"source": "loop", "step": step}, {})
    for task in range(30):
        saver.put_writes(config, [("ch", task), ("other", f"v{task}")], f"task-{task}")
    before = saver.get_tuple(config)
    assert len(before.pending_writes) == 60

    client, sent = live_api.counted_client()
    SessionRewindSaver(client).prune(["prune-many"])
    # The thread's sessions, the head, the head checkpoint's writes, a trim of each session. It used
    # to be 9 (two deletes, two new sessions, the checkpoint, its writes in one batch), and before
    # that a GET and a POST per write (69).
    assert len(sent) <= 5, sent

    fresh = SessionRewindSaver(live_api.client())
    assert [t.checkpoint["id"] for t in fresh.list(config)] == [before.checkpoint["id"]]
    after = fresh.get_tuple({"configurable": {"thread_id": "prune-many", "checkpoint_ns": ""}})
    assert after.checkpoint == before.checkpoint and after.pending_writes == before.pending_writes


class _Crash(BaseException):
    """The engine's process dying mid-call (not an error the client would handle or retry)."""


def test_prune_keep_latest_interrupted_at_any_point_leaves_the_latest_checkpoint_readable(live_api):
    """A process that dies part way through `prune` loses nothing the thread reads, and pruning again
    finishes the job. It used to delete the thread's sessions, then record the latest checkpoint
    again: dying between the two lost it."""
    import httpx
    from langgraph.checkpoint.conformance.test_utils import generate_checkpoint
    from session_rewind_client import Client

    def crashing_client(writes_allowed: int) -> Client:
        writes: list[str] = []

        def request(request: httpx.Request) -> None:
            if request.method in ("POST", "DELETE", "PATCH"):
                if len(writes) == writes_allowed:
                    raise _Crash(f"died before {request.method} {request.url.path}")
                writes.append(request.url.path)

        return live_api.hooked_client(on_request=request, max_retries=0)

    for crash_at in range(3):
        saver = SessionRewindSaver(live_api.client())
        config = {"configurable": {"thread_id": f"prune-crash-{crash_at}", "checkpoint_ns": ""}}
        for step in range(3):
            config = saver.put(config, generate_checkpoint(), {"source": "loop", "step": step}, {})
            saver.put_writes(config, [("ch", step)], f"task-{step}")
        before = saver.get_tuple(config)
        thread = {"configurable": {"thread_id": config["configurable"]["thread_id"], "checkpoint_ns": ""}}
        try:
            SessionRewindSaver(crashing_client(crash_at)).prune([thread["configurable"]["thread_id"]])
        except _Crash:
            pass
        after = SessionRewindSaver(live_api.client()).get_tuple(thread)
        assert after is not None, f"the latest checkpoint was lost when prune died before write {crash_at}"
        assert (after.checkpoint, after.pending_writes) == (before.checkpoint, before.pending_writes)

        SessionRewindSaver(live_api.client()).prune([thread["configurable"]["thread_id"]])
        fresh = SessionRewindSaver(live_api.client())
        assert [t.checkpoint["id"] for t in fresh.list(thread)] == [before.checkpoint["id"]]
        assert fresh.get_tuple(thread).pending_writes == before.pending_writes


def test_prune_keep_latest_of_a_thread_written_meanwhile_is_refused_and_removes_nothing_new(live_api):
    """A checkpoint written while `prune` reads the thread is kept: the trim names the head it read,
    the server refuses it (409), and the checkpoint stays the thread's latest. (The old prune deleted
    the sessions whatever had been written since it read them.)"""
    import httpx
    import pytest
    from langgraph.checkpoint.conformance.test_utils import generate_checkpoint
    from session_rewind_client import ConflictError

    writer = SessionRewindSaver(live_api.client())
    config = {"configurable": {"thread_id": "prune-busy", "checkpoint_ns": ""}}
    for step in range(2):
        config = writer.put(config, generate_checkpoint(), {"source": "loop", "step": step}, {})
    meanwhile = generate_checkpoint()

    def write_first(request: httpx.Request) -> None:
        if request.url.path.endswith("/trim/") and meanwhile["id"] not in written:
            written.append(meanwhile["id"])
            writer.put(config, meanwhile, {"source": "loop", "step": 2}, {})

    written: list[str] = []
    with pytest.raises(ConflictError):
        SessionRewindSaver(live_api.hooked_client(on_request=write_first, max_retries=0)).prune(["prune-busy"])
    thread = {"configurable": {"thread_id": "prune-busy", "checkpoint_ns": ""}}
    fresh = SessionRewindSaver(live_api.client())
    assert fresh.get_tuple(thread).checkpoint["id"] == meanwhile["id"]
    assert len(list(fresh.list(thread))) == 3


def test_prune_keep_latest_keeps_the_writes_a_rewound_head_reads_as_its_own(live_api, rewind):
    """Asked and answered, then an operator rewinds to the question: the answer's writes belong to the
    run before the rewind. Pruning used to bring them back as the head's, so the graph took the
    question for answered and finished without asking again."""
    from langgraph.types import Command

    graph = talk_graph(SessionRewindSaver(rewind))
    config = {"configurable": {"thread_id": "prune-rewound"}}
    graph.invoke({"turns": 1, "log": []}, config)
    session = rewind.list_sessions(external_id="prune-rewound")["results"][0]
    question = rewind.head(session["id"])
    graph.invoke(Command(resume="yes"), config)
    rewind.rewind(session["id"], question["number"], reason="ask again")
    before = state_shape(graph.get_state(config))
    assert before[1] == ("ask",) and before[4] == [("ask", [], None)]

    SessionRewindSaver(live_api.client()).prune(["prune-rewound"])
    graph = talk_graph(SessionRewindSaver(live_api.client()))
    assert state_shape(graph.get_state(config)) == before
    assert graph.invoke(None, config)["__interrupt__"][0].value == "go on?"
