"""A minimal RL rollout loop: many concurrent episodes, each acquiring a sandbox, writing the
policy's code into it, running the tests, scoring, and releasing the sandbox.

    pip install ./sdk/python
    ARL_ENDPOINTS=http://127.0.0.1:8420 python examples/rollout.py --episodes 256 --concurrency 64

The "policy" here is a stub that sometimes writes a wrong solution; replace `propose()` with
your model. Infrastructure failures (``ArlError.retryable``) are masked out of the batch
instead of being scored as failures.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass

import arl

TESTS = """\
from solution import add

def test_add():
    assert add(2, 3) == 5
    assert add(-1, 1) == 0

if __name__ == "__main__":
    test_add()
    print("PASS")
"""


def propose(episode: int) -> str:
    """Stand-in for a model's completion: mostly right, sometimes wrong."""
    op = "+" if random.random() < 0.8 else "-"
    return f"def add(a, b):\n    return a {op} b\n"


@dataclass
class Episode:
    index: int
    reward: float | None  # None = masked (infrastructure failure)
    seconds: float
    detail: str = ""


async def run_episode(client: arl.AsyncClient, i: int, pool: str, sem: asyncio.Semaphore) -> Episode:
    async with sem:
        t0 = time.perf_counter()
        try:
            async with client.sandbox(pool, ttl=300) as sb:
                await sb.write_files({"solution.py": propose(i), "test_solution.py": TESTS})
                r = await sb.exec(["python3", "test_solution.py"], timeout=30)
                reward = 1.0 if r.exit_code == 0 and "PASS" in r.stdout else 0.0
                detail = "timeout" if r.timed_out else (r.stderr.strip().splitlines() or [""])[-1]
                return Episode(i, reward, time.perf_counter() - t0, detail)
        except arl.ArlError as e:
            if e.retryable:
                return Episode(i, None, time.perf_counter() - t0, f"masked: {e}")
            raise


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--pool", default="default")
    args = ap.parse_args()

    sem = asyncio.Semaphore(args.concurrency)
    t0 = time.perf_counter()
    async with arl.AsyncClient() as client:  # ARL_ENDPOINTS / ARL_TOKEN
        episodes = await asyncio.gather(*(run_episode(client, i, args.pool, sem) for i in range(args.episodes)))
    wall = time.perf_counter() - t0

    scored = [e.reward for e in episodes if e.reward is not None]
    masked = sum(e.reward is None for e in episodes)
    lat = sorted(e.seconds for e in episodes)
    print(f"{len(episodes)} episodes in {wall:.2f}s ({len(episodes) / wall:.0f}/s), "
          f"mean reward {sum(scored) / max(1, len(scored)):.2f}, masked {masked}, "
          f"episode p50 {lat[len(lat) // 2] * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
