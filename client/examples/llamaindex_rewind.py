"""A LlamaIndex workflow that fails half-way, is rewound, and resumes to completion.

Against `make run`'s server (in another terminal):

    .venv/bin/python manage.py create_api_key --project demo --name examples --scopes read,write
    export SESSION_REWIND_API_KEY=sr_...        # what that printed
    .venv/bin/python client/examples/llamaindex_rewind.py

Every finished step becomes a version of the session "example-order-<time>" (see it in the
dashboard). The `charge` step fails on the first run; the session is then rewound to the version
recorded after `price` (the last good step) and the workflow resumes from there.
"""

from __future__ import annotations

import asyncio
import time

from session_rewind_client import AsyncClient
from session_rewind_client.llamaindex import WorkflowRecorder
from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StopEvent


class Fetched(Event):
    subtotal: int


class Priced(Event):
    total: int


class Charged(Event):
    receipt: str


class OrderWorkflow(Workflow):
    def __init__(self, *, provider_down: bool = False) -> None:
        super().__init__(timeout=60)
        self.provider_down = provider_down

    @step
    async def fetch(self, ctx: Context, ev: StartEvent) -> Fetched:
        await ctx.store.set("log", [f"fetched {ev.quantity} x {ev.sku}"])
        return Fetched(subtotal=ev.quantity * 12)

    @step
    async def price(self, ctx: Context, ev: Fetched) -> Priced:
        total = ev.subtotal + 5
        await ctx.store.set("log", [*await ctx.store.get("log"), f"priced at {total} (shipping 5)"])
        return Priced(total=total)

    @step
    async def charge(self, ctx: Context, ev: Priced) -> Charged:
        if self.provider_down:
            raise ConnectionError("payment provider timed out")
        await ctx.store.set("log", [*await ctx.store.get("log"), f"charged {ev.total}"])
        return Charged(receipt=f"R-{ev.total}")

    @step
    async def ship(self, ctx: Context, ev: Charged) -> StopEvent:
        return StopEvent(result={"receipt": ev.receipt, "log": [*await ctx.store.get("log"), "shipped"]})


async def main() -> None:
    external_id = f"example-order-{int(time.time())}"
    async with AsyncClient() as client:  # SESSION_REWIND_URL (default http://127.0.0.1:8000), SESSION_REWIND_API_KEY
        recorder = WorkflowRecorder(client)

        first = await recorder.run(OrderWorkflow(provider_down=True), external_id=external_id, sku="mug", quantity=2)
        for v in first.versions:
            print(f"v{v['number']}: {v['step']:<6} {v['status']:<9} {v['error']}")
        print(f"run failed: {first.error!r}")

        last_good = next(v for v in reversed(first.versions) if v["status"] == "running")
        head = await client.rewind(first.session_id, last_good["number"], reason="provider is back; retry the charge")
        print(f"rewound: v{head['number']} = v{last_good['number']} (after {last_good['step']})")

        ctx = await recorder.load_context(OrderWorkflow(), first.session_id)
        second = await recorder.run(OrderWorkflow(), external_id=external_id, ctx=ctx)
        for v in second.versions:
            print(f"v{v['number']}: {v['step']:<6} {v['status']}")
        print("result:", second.result)
        print(f"session: {first.session_id} (open it in the dashboard to see the branch and diff the versions)")


if __name__ == "__main__":
    asyncio.run(main())
