"""Redis commands per job: what one job costs the fleet's Redis, at a few and at many denoising steps.

    python benchmarks/redis_traffic.py                    # 8 jobs at 4 steps, 8 at 200 steps
    python benchmarks/redis_traffic.py --jobs 3 --steps 4 50   # a smoke run (the test suite's)

A private redis-server, one CPU worker (`lorafleet worker --device cpu`, the tiny model) and
`lorafleet submit --wait`, as a user runs them. For each step count, a batch of `--jobs` jobs
(17×128×128, so that 200 steps take seconds, as a real render's steps do) is
submitted and waited for; Redis' own `INFO commandstats` is read before and after, so every
command counts, whoever sent it (the worker's Celery consumer, its ledger, its heartbeat and
sweeper, the waiting producer) and commands run inside Lua scripts too. It prints the commands per
job, and the commands that make most of them. A render's cost in Redis should not grow with its
length: at 200 steps a job costs what it costs at 4.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis  # noqa: E402

from lorafleet.redis_server import RedisServer  # noqa: E402
from workers.supervisor import spawn_worker, stop_worker, wait_until_ready  # noqa: E402
from workers.tiny_model import write_tiny_model  # noqa: E402


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (`INFO commandstats`), without `info` itself."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items() if name != "cmdstat_info"}


def batch_of(jobs: int, steps: int, work: str, env: dict) -> tuple[dict[str, int], float]:
    """Submit `jobs` jobs of `steps` steps and wait for them; returns the commands they cost, by name."""
    path = os.path.join(work, f"jobs-{steps}.jsonl")
    with open(path, "w") as f:
        for i in range(jobs):
            job = {
                "prompt": f"a fox runs {i}",
                "seed": steps * 1000 + i,
                "steps": steps,
                "num_frames": 17,
                "height": 128,
                "width": 128,
            }
            f.write(json.dumps(job) + "\n")
    client = redis.Redis.from_url(env["LORAFLEET_REDIS_URL"])
    before = commandstats(client)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lorafleet", "submit", path, "--wait", "--batch", f"traffic-{steps}"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    after = commandstats(client)
    return {name: after[name] - before.get(name, 0) for name in after if after[name] > before.get(name, 0)}, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 200])
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="redis-traffic-")
    paths = write_tiny_model(os.path.join(work, "tiny"))
    rows = {}
    with RedisServer() as server:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")},
            "LORAFLEET_REDIS_URL": server.url,
            "LORAFLEET_STORE_URL": os.path.join(work, "store"),
            "LORAFLEET_MODEL": paths["model"],
            "LORAFLEET_ADAPTER_CACHE_DIR": os.path.join(work, "adapter-cache"),
        }
        log_path = os.path.join(work, "worker.log")
        worker = spawn_worker(["--device", "cpu"], env, log_path)
        try:
            wait_until_ready(worker, log_path)
            for steps in args.steps:
                rows[steps] = batch_of(args.jobs, steps, work, env)
        finally:
            stop_worker(worker)

    print(f"\nRedis commands per job: {args.jobs} jobs a batch, one CPU worker, tiny model, `submit --wait`\n")
    print("| steps | seconds a job | commands a job | the most called (per job) |\n|---|---|---|---|")
    for steps, (calls, seconds) in rows.items():
        top = sorted(calls.items(), key=lambda item: -item[1])[:6]
        named = ", ".join(f"{name} {count / args.jobs:.1f}" for name, count in top)
        print(f"| {steps} | {seconds / args.jobs:.2f} | {sum(calls.values()) / args.jobs:.1f} | {named} |")
    names = sorted(
        {name for calls, _ in rows.values() for name in calls}, key=lambda n: -rows[args.steps[-1]][0].get(n, 0)
    )
    print("\n| command (per job) | " + " | ".join(f"{steps} steps" for steps in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{calls.get(name, 0) / args.jobs:.1f}" for calls, _ in rows.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
