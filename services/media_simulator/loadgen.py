"""Load generator: how many dials/s one media simulator sustains.

``python -m services.media_simulator.loadgen --address 127.0.1.1:7400 [--window 500] [--duration-s 10]
[--warmup-s 2] [--json]`` keeps ``window`` calls in flight through one MediaClient (each worker dials,
waits for the outcome, dials again) and reports accepted dials and outcomes per second over the measured
interval. With ``--json`` the last line is one JSON object (``dials_per_s``, ``outcomes_per_s``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
import uuid
from collections import Counter

from pom_ha.ha.logsetup import configure_logging
from pom_ha.media.client import MediaClient, MediaUnavailable
from pom_ha.media.protocol import Accepted, Dial, Outcome


async def measure(address: tuple[str, int], *, window: int, duration_s: float, warmup_s: float) -> dict[str, object]:
    waiting: dict[str, asyncio.Future[Outcome]] = {}

    async def on_outcome(outcome: Outcome) -> None:
        fut = waiting.pop(outcome.attempt_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    run = uuid.uuid4().hex[:8]
    ids = itertools.count()
    counts: Counter[str] = Counter()
    measuring = False
    stop = False

    async def worker(client: MediaClient) -> None:
        loop = asyncio.get_running_loop()
        while not stop:
            n = next(ids)
            cmd = Dial(f"{run}-{n}", f"load-{run}", f"c{n}", 1, f"+1555{n % 10**7:07d}", 1, f"job/load-{run}")
            fut: asyncio.Future[Outcome] = loop.create_future()
            waiting[cmd.attempt_id] = fut
            try:
                reply = await client.dial(cmd)
            except MediaUnavailable:
                waiting.pop(cmd.attempt_id, None)
                counts["unavailable"] += 1
                continue
            if not isinstance(reply, Accepted):
                waiting.pop(cmd.attempt_id, None)
                counts[f"rejected_{reply.reason}"] += 1
                await asyncio.sleep(0.001)
                continue
            if measuring:
                counts["dials"] += 1
            await fut
            if measuring:
                counts["outcomes"] += 1

    async with MediaClient([address], on_outcome=on_outcome, reply_timeout_s=10.0) as client:
        await client.wait_connected(10)
        workers = [asyncio.create_task(worker(client)) for _ in range(window)]
        await asyncio.sleep(warmup_s)
        measuring, t0 = True, time.monotonic()
        await asyncio.sleep(duration_s)
        measuring, elapsed = False, time.monotonic() - t0
        stop = True
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        stats = await client.stats()
    return {
        "dials_per_s": round(counts["dials"] / elapsed, 1),
        "outcomes_per_s": round(counts["outcomes"] / elapsed, 1),
        "window": window, "measured_s": round(elapsed, 2),
        "rejected": {k: v for k, v in counts.items() if k.startswith("rejected_") or k == "unavailable"},
        "peak_in_progress": stats.peak_in_progress, "capacity": stats.capacity,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="media-loadgen", description=__doc__)
    p.add_argument("--address", required=True, help="host:port of the media simulator")
    p.add_argument("--window", type=int, default=500, help="calls kept in flight")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    configure_logging("WARNING")
    host, _, port = args.address.rpartition(":")
    result = asyncio.run(measure((host, int(port)), window=args.window, duration_s=args.duration_s,
                                 warmup_s=args.warmup_s))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
