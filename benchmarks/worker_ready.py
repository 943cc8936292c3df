"""How long a worker takes from process start to READY, side by side: eager and compiled, with the
page cache warm or the model's files evicted from it, with and without the weight prefetch, and a
compiled worker with and without the fleet's shared compile artifacts.

    python benchmarks/worker_ready.py --model 5b --store /tmp/s          # on a GPU (writes a full-size random 5B once)
    python benchmarks/worker_ready.py --model tiny --device cpu          # on the CPU, the tiny model

Each run is `lorafleet worker` as a user starts it (a fresh process, against a private Redis),
stopped once it says READY; its own log lines give the figures: seconds from process start to the
end of its imports, the model's load, the compile, and READY (Celery consuming). "evicted" asks the
kernel to drop the model's files from the page cache first (posix_fadvise DONTNEED: what a new pod
on a new node sees), which some sandboxes ignore: compare the load column. Compiled runs get an
empty inductor cache of their own; "cold" also an empty store, "shared" the artifacts the cold run
signed and shared.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lorafleet.redis_server import RedisServer  # noqa: E402

RUNS = {  # name: (compile, evict the model's files first, prefetch)
    "eager": (False, False, True),
    "eager:evicted": (False, True, True),
    "eager:evicted,no-prefetch": (False, True, False),
    "compiled:cold": (True, False, True),
    "compiled:shared": (True, False, True),
}
FIGURES = {
    "imports done s": r"(\d+\.\d)s after start, imports done",
    "load s": r"model loaded in (\d+\.\d)s",
    "compile s": r"compiled the transformer .* in (\d+\.\d)s",
    "READY s": r"READY (\d+\.\d)s after start",
}


def evict(folder: str) -> None:
    """Ask the kernel to drop a folder's files from the page cache."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def start_to_ready(env: dict, device_args: list[str], log_path: str, timeout_s: float) -> dict:
    """Start one worker, wait for READY, stop it; the figures its log gives."""
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "lorafleet", "worker", *device_args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline and worker.poll() is None:
        text = open(log_path).read()
        if " READY " in text:
            break
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
    text = open(log_path).read()
    if " READY " not in text:
        print(text[-3000:], flush=True)
    row = {}
    for name, pattern in FIGURES.items():
        found = re.search(pattern, text)
        row[name] = float(found[1]) if found else None
    row["compiled from"] = (
        "shared artifacts"
        if "with the fleet's shared artifacts" in text
        else ("scratch" if "from scratch" in text else "-")
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="5b", choices=["2b", "5b", "tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--store", default=None, help="a folder for the model (kept between invocations)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--timeout", type=float, default=400)
    args = parser.parse_args()
    work = args.store or tempfile.mkdtemp(prefix="worker-ready-")
    if args.model == "tiny":
        from workers.tiny_model import write_tiny_model

        model = os.path.join(work, "tiny", "model")
        if not os.path.isdir(model):
            write_tiny_model(os.path.join(work, "tiny"))
    else:
        from benchmarks.full_size import ensure_pipeline

        model = ensure_pipeline(os.path.join(work, args.model), args.model)["model"]
    device_args = ["--gpu", "0"] if args.device == "cuda" else ["--device", "cpu"]
    store = os.path.join(work, f"store-{time.time_ns()}")
    rows = {}
    with RedisServer() as redis:
        for run in args.runs:
            compiled, evicted, prefetch = RUNS[run]
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")},
                "LORAFLEET_REDIS_URL": redis.url,
                "LORAFLEET_STORE_URL": store,
                "LORAFLEET_MODEL": model,
                "LORAFLEET_COMPILE": str(compiled).lower(),
                "LORAFLEET_COMPILE_CACHE_SECRET": "worker-ready-benchmark",
                "LORAFLEET_PREFETCH_WEIGHTS": str(prefetch).lower(),
                "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-"),  # this run's own: cold
            }
            if evicted:
                evict(model)
            rows[run] = start_to_ready(env, device_args, os.path.join(work, f"{run}.log"), args.timeout)
            print(run, rows[run], flush=True)

    print(f"\nworker start to READY, {args.model} on {args.device} ({os.cpu_count()} cores)\n")
    columns = [*FIGURES, "compiled from"]
    print("| run | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for run, row in rows.items():
        print(f"| {run} | " + " | ".join("-" if row[c] is None else str(row[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
