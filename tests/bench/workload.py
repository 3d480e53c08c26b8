"""Seeded traces of realistic agent / workflow contexts for the state-store benchmark.

A trace is one session's life: a context dict that an engine persists after every step. Each step
does what agent loops do: append to the message history, bump counters, move the execution pointer,
push and pop the event queue, rewrite the scratchpad, sometimes replace a 5-50 KB tool result,
sometimes fail and clear an error, and keep some store values as JSON text (as LlamaIndex Workflows
does). Text is drawn from a fixed pseudo-vocabulary, so it compresses like prose, not like noise.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    sessions: int
    versions: int
    initial_messages: int  # history already present at version 1
    message_chars: tuple[int, int]  # size range of one new message
    message_chance: float  # probability that a step appends a message
    tool_chance: float  # probability that a step replaces the tool result (5-50 KB)
    documents: int = 0  # retrieved documents kept in the context (the ~5 MB profile)
    document_chars: tuple[int, int] = (3000, 6000)

    def scaled(self, *, sessions: int | None = None, versions: int | None = None) -> Profile:
        return Profile(**{**self.__dict__, "sessions": sessions or self.sessions, "versions": versions or self.versions})


# Sizes chosen so the default run fits in ~3 minutes on a 2-core machine (see README "Benchmark").
PROFILES: dict[str, Profile] = {
    "agent-200k": Profile(
        "agent-200k", sessions=20, versions=100, initial_messages=70, message_chars=(300, 3000),
        message_chance=0.6, tool_chance=0.35,
    ),
    "long-2000": Profile(
        "long-2000", sessions=2, versions=2000, initial_messages=10, message_chars=(80, 400),
        message_chance=0.4, tool_chance=0.1,
    ),
    "docs-5mb": Profile(
        "docs-5mb", sessions=3, versions=50, initial_messages=20, message_chars=(300, 2000),
        message_chance=0.7, tool_chance=0.35, documents=1100,
    ),
}
QUICK: dict[str, Profile] = {
    "agent-200k": PROFILES["agent-200k"].scaled(sessions=2, versions=30),
    "long-2000": PROFILES["long-2000"].scaled(sessions=1, versions=300),
    "docs-5mb": PROFILES["docs-5mb"].scaled(sessions=1, versions=10),
}

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "qu", "an", "el", "or", "is", "um", "ex",
              "tra", "pro", "con", "der", "ing", "tion", "ment", "al", "er", "ly", "st", "ch", "th", "pl"]
_TOOLS = ["web_search", "read_file", "run_sql", "http_get", "python", "vector_lookup"]
_STEPS = ["plan", "retrieve", "call_tool", "observe", "reflect", "respond", "route", "validate"]
_EVENTS = ["StartEvent", "ToolCallEvent", "ToolResultEvent", "RetryEvent", "InputRequiredEvent", "StopEvent"]


class _Text:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        vocabulary_rng = random.Random(7)  # the same language in every trace
        self.words = sorted(
            {"".join(vocabulary_rng.choices(_SYLLABLES, k=vocabulary_rng.randint(1, 4))) for _ in range(4000)}
        )
        # Zipf-like word frequencies, as in prose.
        self.weights = [1.0 / (rank + 1) for rank in range(len(self.words))]

    def prose(self, chars: int) -> str:
        words = self.rng.choices(self.words, self.weights, k=max(1, chars // 6))
        text = " ".join(words)
        return text[:chars]


class Trace:
    """One session's sequence of states; `states()` mutates and yields the same dict each step."""

    def __init__(self, profile: Profile, seed: int) -> None:
        self.profile = profile
        self.rng = random.Random(seed)
        self.text = _Text(self.rng)
        self.message_index = 0
        self.event_index = 0

    def _message(self, role: str | None = None) -> dict[str, Any]:
        low, high = self.profile.message_chars
        role = role or self.rng.choice(["user", "assistant", "assistant", "tool"])
        message: dict[str, Any] = {"id": f"msg-{self.message_index:06d}", "role": role,
                                   "content": self.text.prose(self.rng.randint(low, high))}
        if role == "assistant" and self.rng.random() < 0.3:
            message["tool_calls"] = [{"id": f"call-{self.message_index}", "name": self.rng.choice(_TOOLS),
                                      "arguments": json.dumps({"query": self.text.prose(60)})}]
        self.message_index += 1
        return message

    def _document(self, index: int) -> dict[str, Any]:
        low, high = self.profile.document_chars
        return {
            "id": f"doc-{index:05d}",
            "title": self.text.prose(50),
            "text": self.text.prose(self.rng.randint(low, high)),
            "score": round(self.rng.random(), 4),
            "metadata": {"source": self.rng.choice(["wiki", "crm", "tickets", "docs"]), "chunk": index % 17},
        }

    def _tool_result(self) -> dict[str, Any]:
        size = self.rng.randint(5_000, 50_000)
        if self.rng.random() < 0.5:
            rows = [{"rank": i, "title": self.text.prose(40), "snippet": self.text.prose(300)}
                    for i in range(max(1, size // 400))]
            return {"tool": "web_search", "status": 200, "rows": rows}
        return {"tool": self.rng.choice(_TOOLS), "status": 200, "body": self.text.prose(size)}

    def _event(self) -> dict[str, Any]:
        self.event_index += 1
        return {"id": self.event_index, "type": self.rng.choice(_EVENTS), "payload": {"note": self.text.prose(40)}}

    def initial(self) -> dict[str, Any]:
        profile = self.profile
        state: dict[str, Any] = {
            "messages": [self._message("system")] + [self._message() for _ in range(profile.initial_messages)],
            "counters": {"steps": 0, "tokens_in": 0, "tokens_out": 0, "tool_calls": 0, "retries": 0},
            "pointer": {"step": "start", "node": "agent", "attempt": 0},
            "queue": [self._event() for _ in range(3)],
            "scratchpad": self.text.prose(800),
            "tool_result": self._tool_result(),
            "error": None,
            # Engine-owned store values kept as JSON text (LlamaIndex Workflows' Context does this).
            "store": {
                "plan": json.dumps({"goal": self.text.prose(120), "steps": [self.text.prose(80) for _ in range(8)]}),
                "user": json.dumps({"id": self.rng.randint(1, 10**6), "locale": "en", "tier": "pro"}),
            },
        }
        if profile.documents:
            state["documents"] = [self._document(i) for i in range(profile.documents)]
        return state

    def states(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(state, metadata) per version. The state dict is mutated in place after each yield."""
        rng = self.rng
        profile = self.profile
        state = self.initial()
        yield state, {"step": "start", "status": "running"}
        for step in range(1, profile.versions):
            counters = state["counters"]
            counters["steps"] = step
            counters["tokens_in"] += rng.randint(200, 4000)
            counters["tokens_out"] += rng.randint(20, 800)
            name = rng.choice(_STEPS)
            state["pointer"] = {"step": name, "node": rng.choice(["agent", "tools", "router"]), "attempt": 0}
            if rng.random() < profile.message_chance:
                state["messages"].append(self._message())
            queue = state["queue"]
            for _ in range(rng.randint(0, 2)):
                if queue:
                    queue.pop(0)
            for _ in range(rng.randint(0, 2)):
                queue.append(self._event())
            scratchpad = state["scratchpad"] + "\n" + self.text.prose(rng.randint(60, 240))
            # Agents summarise their scratchpad when it grows past a few KB.
            state["scratchpad"] = scratchpad if len(scratchpad) < 6000 else self.text.prose(800)
            if rng.random() < profile.tool_chance:
                counters["tool_calls"] += 1
                state["tool_result"] = self._tool_result()
            if profile.documents and rng.random() < 0.8:
                documents = state["documents"]
                for _ in range(rng.randint(1, 3)):
                    index = rng.randrange(len(documents))
                    if rng.random() < 0.5:
                        documents[index]["score"] = round(rng.random(), 4)
                    else:
                        documents[index] = self._document(len(documents) + step * 10 + index)
            if rng.random() < 0.3:
                plan = json.loads(state["store"]["plan"])
                plan["steps"][rng.randrange(len(plan["steps"]))] = self.text.prose(80)
                plan["done"] = step
                state["store"]["plan"] = json.dumps(plan)
            metadata: dict[str, Any] = {"step": name, "status": "running"}
            if state["error"] is not None:
                state["error"] = None
            elif rng.random() < 0.03:
                counters["retries"] += 1
                error = {"type": "ToolTimeout", "message": self.text.prose(100), "traceback": self.text.prose(1200)}
                state["error"] = error
                metadata["error"] = error["message"]
            if step == profile.versions - 1:
                metadata["status"] = "completed"
            yield state, metadata
