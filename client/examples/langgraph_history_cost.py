"""What reading a LangGraph thread's history costs through `SessionRewindSaver`: requests and time.

Runs a one-node chat loop (each superstep appends a ~200-character message, so states grow as an
agent's history does) to 50 and 200 checkpoints, then reads the history the way an application
does, with a fresh saver each time (nothing cached, as another process would): all of it
(`get_state_history`), the first ten (`limit=10`) and only the newest (`next(saver.list(config))`). Requests are
counted at the client. Needs a server and a key with write scope (with admin scope it also deletes
the sessions it made):

    SESSION_REWIND_URL=http://127.0.0.1:8000 SESSION_REWIND_API_KEY=sr_... \\
        .venv/bin/python client/examples/langgraph_history_cost.py [checkpoints ...]
"""

from __future__ import annotations

import operator
import os
import statistics
import sys
import time
import uuid
from typing import Annotated, TypedDict

import httpx
from langgraph.graph import END, START, StateGraph
from session_rewind_client import Client, PermissionDenied
from session_rewind_client.langgraph import SessionRewindSaver


class Chat(TypedDict):
    turns: int
    log: Annotated[list[str], operator.add]


def chat_graph(saver: SessionRewindSaver, turns: int):
    def turn(state: Chat) -> dict:
        n = len(state["log"])
        return {"log": [f"message {n} " + "x" * 200]}

    builder = StateGraph(Chat)
    builder.add_node("turn", turn)
    builder.add_edge(START, "turn")
    builder.add_conditional_edges("turn", lambda state: "turn" if len(state["log"]) < turns else END, ["turn", END])
    return builder.compile(checkpointer=saver)


def counted_client(url: str, key: str) -> tuple[Client, list[str]]:
    sent: list[str] = []
    http = httpx.Client(base_url=f"{url.rstrip('/')}/api/v1/", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                        event_hooks={"request": [lambda request: sent.append(f"{request.method} {request.url.path}")]})
    return Client(http=http), sent


def measure(url: str, key: str, checkpoints: int, repeats: int = 3) -> None:
    turns = checkpoints - 2  # the input checkpoint and one before the first turn
    thread = f"history-cost-{checkpoints}-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread}, "recursion_limit": checkpoints + 10}
    root = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    with Client(url, api_key=key) as writer:
        chat_graph(SessionRewindSaver(writer), turns).invoke({"turns": turns, "log": []}, config)
    # get_state_history reads the whole list() before it hands out anything; a direct caller of
    # the saver's list can stop early.
    readings = {
        "get_state_history": lambda graph, saver: len(list(graph.get_state_history(config))),
        "limit=10": lambda graph, saver: len(list(graph.get_state_history(config, limit=10))),
        "next(saver.list())": lambda graph, saver: int(next(saver.list(root), None) is not None),
    }
    for name, read in readings.items():
        times, counts, got = [], [], 0
        for _ in range(repeats):
            client, sent = counted_client(url, key)
            with client:
                saver = SessionRewindSaver(client)
                graph = chat_graph(saver, turns)
                started = time.perf_counter()
                got = read(graph, saver)
                times.append(time.perf_counter() - started)
                counts.append(len(sent))
        print(f"{checkpoints:>6} {name:<18} {got:>5} {max(counts):>9} {statistics.median(times) * 1000:>10.0f}")
    with Client(url, api_key=key) as cleanup:
        try:
            SessionRewindSaver(cleanup).delete_thread(thread)
        except PermissionDenied:  # deleting a session needs an admin key; a write key measures all the same
            print(f"(left the session {thread!r} in place: deleting it needs a key with admin scope)")


def main() -> None:
    url = os.environ.get("SESSION_REWIND_URL", "http://127.0.0.1:8000")
    key = os.environ["SESSION_REWIND_API_KEY"]
    sizes = [int(arg) for arg in sys.argv[1:]] or [50, 200]
    print(f"{'thread':>6} {'read':<18} {'items':>5} {'requests':>9} {'median ms':>10}")
    for checkpoints in sizes:
        measure(url, key, checkpoints)


if __name__ == "__main__":
    main()
