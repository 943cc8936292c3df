"""Big batches: what submitting, following and `status` cost at 1k, 10k and 100k jobs, and the
per-job queue overhead of a running worker.

    python benchmarks/queue_scale.py                       # 1k, 10k, 100k (minutes, mostly the 100k submit)
    python benchmarks/queue_scale.py --sizes 200 --overhead-jobs 10   # a smoke run (the test suite's)

Against a private Redis and a local store, on the tiny model, in this process:
  submit    `producer.submit.submit` of an N-line jobs file whose jobs all name one adapter (as a
            sweep's do): check every line, resolve the adapter, key it, look for its video in the
            store, write the manifest and jobs, enqueue (no worker runs)
  peak MB   the largest resident size of this process so far (Linux ru_maxrss), after the submit
  poll      one `producer.follow.refresh` of the N-job batch: what `wait` does every 0.5 s
  status    `producer.follow.status`: load the manifest, refresh, write it, print the counts
Then one CPU worker renders a batch of small jobs; its overhead per job is the time from one job's
"rendered … uploaded" log line to the next job's "started" line (the Celery round trip, the
ledger's lease, the checks), as benchmarks/fleet_scaling.py measures it.
"""

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rich.console import Console  # noqa: E402

from benchmarks.fleet_scaling import gaps, render_spans  # noqa: E402
from common.broker import make_app  # noqa: E402
from common.settings import Settings  # noqa: E402
from lorafleet.redis_server import RedisServer  # noqa: E402
from producer.follow import refresh, status, wait_for_batch  # noqa: E402
from producer.submit import submit  # noqa: E402
from workers.supervisor import spawn_worker, stop_worker, wait_until_ready  # noqa: E402
from workers.tiny_model import write_tiny_model  # noqa: E402

TARGETS = {"submit (s)": {100_000: 10.0}, "poll (s)": {100_000: 0.2}, "status (s)": {100_000: 2.0}}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(size: int, settings: Settings, work: str, adapter: str) -> dict:
    path = os.path.join(work, f"jobs-{size}.jsonl")
    with open(path, "w") as f:
        for i in range(size):
            job = {
                "id": f"job{i}", "prompt": f"a cat walks along the beach {i % 97}", "seed": i, "steps": 2,
                "num_frames": 9, "height": 32, "width": 32, "adapters": [{"uri": adapter, "weight": 0.7}],
            }  # fmt: skip
            f.write(json.dumps(job) + "\n")
    started = time.perf_counter()
    batch = submit(path, settings, f"scale-{size}")
    row = {"submit (s)": time.perf_counter() - started, "peak MB": peak_mb()}
    app = make_app(settings)
    refresh(batch, app)  # the first poll opens the connections
    started = time.perf_counter()
    refresh(batch, app)
    row["poll (s)"] = time.perf_counter() - started
    started = time.perf_counter()
    status(settings, batch.name, Console(file=io.StringIO()))
    row["status (s)"] = time.perf_counter() - started
    return row


def worker_overhead(env: dict, jobs: int, work: str) -> list[float]:
    """Seconds between one job's render and the next one's on a worker, over `jobs` small jobs (on a
    Redis of their own: the big batches above stay unrendered)."""
    with RedisServer() as redis:
        env = {**env, "LORAFLEET_REDIS_URL": redis.url}
        settings = settings_of(env)
        log_path = os.path.join(work, "worker.log")
        worker = spawn_worker(["--device", "cpu"], {**os.environ, **env}, log_path)
        try:
            wait_until_ready(worker, log_path)
            path = os.path.join(work, "overhead.jsonl")
            with open(path, "w") as f:
                for i in range(jobs):
                    f.write(json.dumps({"prompt": "a dog runs", "seed": 10_000_000 + i, "steps": 40}) + "\n")
            batch = submit(path, settings, "overhead")
            wait_for_batch(batch, settings, Console(file=io.StringIO()), timeout_s=600)
        finally:
            stop_worker(worker)
    return gaps(render_spans(env["LORAFLEET_STORE_URL"]))


def settings_of(env: dict) -> Settings:
    return Settings(**{k.removeprefix("LORAFLEET_").lower(): v for k, v in env.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--overhead-jobs", type=int, default=50, help="small jobs one worker renders (0: skip)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="queue-scale-")
    paths = write_tiny_model(os.path.join(work, "tiny"))
    with RedisServer() as redis:
        env = {
            "LORAFLEET_REDIS_URL": redis.url,
            "LORAFLEET_STORE_URL": os.path.join(work, "store"),
            "LORAFLEET_MODEL": paths["model"],
            "LORAFLEET_ADAPTER_CACHE_DIR": os.path.join(work, "adapter-cache"),
        }
        rows = {size: measure(size, settings_of(env), work, paths["style"]) for size in args.sizes}
    overhead = worker_overhead(env, args.overhead_jobs, work) if args.overhead_jobs else []

    print(f"\nbig batches on this machine ({os.cpu_count()} cores), private Redis, local store\n")
    print("| metric | " + " | ".join(f"{size:,} jobs" for size in args.sizes) + " | target |")
    print("|---|" + "---|" * (len(args.sizes) + 1))
    for metric in next(iter(rows.values())):
        cells = [f"{rows[size][metric]:.3g}" for size in args.sizes]
        target = ", ".join(f"≤ {value:g} at {size:,}" for size, value in TARGETS.get(metric, {}).items()) or "—"
        print(f"| {metric} | " + " | ".join(cells) + f" | {target} |")
    if overhead:
        print(
            f"\nworker overhead per job ({len(overhead) + 1} jobs, one CPU worker): median "
            f"{statistics.median(overhead) * 1e3:.1f} ms, max {max(overhead) * 1e3:.1f} ms (target ≤ 10 ms)"
        )


if __name__ == "__main__":
    main()
