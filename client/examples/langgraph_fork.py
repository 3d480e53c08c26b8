"""A LangGraph graph checkpointed in Session Rewind, with a fork made by update_state.

Against `make run`'s server (in another terminal):

    .venv/bin/python manage.py create_api_key --project demo --name examples --scopes read,write
    export SESSION_REWIND_API_KEY=sr_...        # what that printed
    .venv/bin/python client/examples/langgraph_fork.py

The thread is a session, every checkpoint a version. After a first run, the state right after
`research` is changed with update_state and the graph resumes from there: the timeline shows the
fork as a branch (a rewind to the `research` checkpoint, then the new checkpoints).
"""

from __future__ import annotations

import operator
import time
from typing import Annotated, TypedDict

from langgraph.graph import END, START, StateGraph
from session_rewind_client import Client
from session_rewind_client.langgraph import SessionRewindSaver


class Trip(TypedDict):
    city: str
    notes: Annotated[list[str], operator.add]


def research(state: Trip) -> dict:
    return {"notes": [f"researched {state['city']}"]}


def book(state: Trip) -> dict:
    return {"notes": [f"booked a hotel in {state['city']}"]}


def summarize(state: Trip) -> dict:
    return {"notes": [f"trip to {state['city']} is ready"]}


def build(saver: SessionRewindSaver):
    graph = StateGraph(Trip)
    graph.add_node("research", research)
    graph.add_node("book", book)
    graph.add_node("summarize", summarize)
    graph.add_edge(START, "research")
    graph.add_edge("research", "book")
    graph.add_edge("book", "summarize")
    graph.add_edge("summarize", END)
    return graph.compile(checkpointer=saver)


def main() -> None:
    with Client() as client:  # SESSION_REWIND_URL (default http://127.0.0.1:8000), SESSION_REWIND_API_KEY
        graph = build(SessionRewindSaver(client))
        config = {"configurable": {"thread_id": f"example-trip-{int(time.time())}"}}

        print("first run:", graph.invoke({"city": "Lisbon", "notes": []}, config)["notes"])

        after_research = next(s for s in graph.get_state_history(config) if s.next == ("book",))
        forked = graph.update_state(after_research.config, {"city": "Porto"})
        print("fork run: ", graph.invoke(None, forked)["notes"])

        session = client.list_sessions(external_id=config["configurable"]["thread_id"])["results"][0]
        for v in reversed(list(client.iter_versions(session["id"]))):
            print(f"v{v['number']}: {v['kind']:<7} parent v{v['parent']}  {v['step']}")
        print(f"session: {session['id']} (open it in the dashboard to see the fork in the timeline)")


if __name__ == "__main__":
    main()
