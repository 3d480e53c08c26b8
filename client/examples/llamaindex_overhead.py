"""How much recording a LlamaIndex workflow per step costs: ctx.to_dict() as the context grows.

A one-step loop appends a ~200-character message to the store per iteration (an agent's history)
and the context is serialized after every step, as `WorkflowRecorder` does. No server needed:

    .venv/bin/python client/examples/llamaindex_overhead.py [steps]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StepState, StepStateChanged, StopEvent


class Tick(Event):
    n: int


class Chat(Workflow):
    def __init__(self, steps: int) -> None:
        super().__init__(timeout=600)
        self.steps = steps

    @step
    async def begin(self, ctx: Context, ev: StartEvent) -> Tick:
        await ctx.store.set("messages", [])
        return Tick(n=0)

    @step
    async def turn(self, ctx: Context, ev: Tick) -> Tick | StopEvent:
        messages = await ctx.store.get("messages")
        messages.append({"role": "assistant" if ev.n % 2 else "user", "content": f"message {ev.n} " + "x" * 200})
        await ctx.store.set("messages", messages)
        return StopEvent(result=len(messages)) if ev.n + 1 >= self.steps else Tick(n=ev.n + 1)


async def measure(steps: int) -> list[tuple[int, float, int]]:
    handler = Chat(steps).run()
    samples: list[tuple[int, float, int]] = []
    async for event in handler.stream_events(expose_internal=True):
        if isinstance(event, StepStateChanged) and event.step_state == StepState.NOT_RUNNING:
            started = time.perf_counter()
            state = handler.ctx.to_dict()
            elapsed = time.perf_counter() - started
            samples.append((len(samples) + 1, elapsed, len(json.dumps(state))))
    await handler
    return samples


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    samples = asyncio.run(measure(steps))
    print(f"{'step':>6} {'to_dict ms':>11} {'context KB':>11}")
    marks = {1, 10, 100, 250, 500, 1000, 2000, len(samples)}
    for number, _, size in samples:
        if number in marks:
            window = [e for n, e, _ in samples if abs(n - number) <= 5]
            print(f"{number:>6} {statistics.median(window) * 1000:>11.2f} {size / 1024:>11.1f}")


if __name__ == "__main__":
    main()
