"""Fleet scaling on one host: jobs per hour under `lorafleet workers` with 1 worker and with all.

    python benchmarks/fleet_scaling.py --device cuda --model 2b --workers 1 all   # a host with several GPUs
    python benchmarks/fleet_scaling.py --device cpu --workers 1 2                 # the tiny model on the CPU

For each worker count, in turn: a fresh store, one `lorafleet workers` supervisor (`--gpus 0,..,N-1`,
or `--cpus N`), every worker READY, then a sweep of 4 adapter sets x 4 lora_scales x 2 seeds (32
jobs) submitted with `lorafleet submit --wait` and timed from submit to its last job done. Printed per
count: jobs per hour, the speed-up over the first count, jobs per worker, the gaps on a worker between
one job's render and its next job's (work was queued all the while; encodes and uploads run in the
background, between renders), and on GPUs which GPU each
worker process holds memory on (nvidia-smi). Then, with the last count's workers still up, one worker
is SIGKILLed mid-render: the supervisor must restart it and the fleet must finish its job.

The model is the tiny one on the CPU, or a full-size random-weight CogVideoX (benchmarks/full_size.py)
on GPUs; a Redis of its own; the store a local folder. Exits 1 if a check fails.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lorafleet.redis_server import RedisServer  # noqa: E402

SCALES = [0.25, 0.5, 0.75, 1.0]
PROMPTS = ["a paper boat floats down a stream", "neon lights flicker in the rain"]
STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
JOB_LINE = re.compile(STAMP + r".*?(\S+)@\S+: ([0-9a-f]{12}) (started|rendered in)")
PID_LINE = re.compile(r"\b((?:gpu|cpu)\d+) (?:\(pid|worker restarted \(pid) (\d+)\)")


def lorafleet(*args: str, env: dict, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "lorafleet", *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, **kwargs)


def write_model(args, folder: str) -> dict[str, str]:
    if args.model == "tiny":
        from workers.tiny_model import write_tiny_model

        paths = write_tiny_model(folder)
        return {"model": paths["model"], "a1": paths["style"], "a2": paths["subject"]}
    from benchmarks.full_size import write_pipeline

    return write_pipeline(folder, args.model, "cuda")


def write_jobs(path: str, paths: dict[str, str], args, seeds=(1, 2)) -> int:
    """4 adapter sets x len(SCALES) scales x the seeds; returns the number of jobs."""
    sets = {
        "a1": [paths["a1"]],
        "a2": [paths["a2"]],
        "a1+a2": [paths["a1"], paths["a2"]],
        "a1.5+a2": [{"uri": paths["a1"], "weight": 0.5}, paths["a2"]],
    }
    with open(path, "w") as f:
        for name, adapters in sets.items():
            for seed in seeds:
                line = {"id": f"{name}-s{seed}", "prompt": PROMPTS[seed % 2], "seed": seed}
                line |= {"adapters": adapters, "lora_scale": SCALES, "steps": args.steps, **size_fields(args)}
                f.write(json.dumps(line) + "\n")
    return len(sets) * len(seeds) * len(SCALES)


def size_fields(args) -> dict:
    """The video size the command line sets; the rest is the model's default."""
    size = {"num_frames": args.frames, "height": args.height, "width": args.width}
    return {field: value for field, value in size.items() if value is not None}


def render_spans(store: str) -> dict[str, list[tuple[float, float]]]:
    """Per worker: when each job it rendered held its device (Unix seconds, from the metadata's
    `rendering`); encoding and uploading follow in the background, outside these spans."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for name in os.listdir(os.path.join(store, "videos")):
        if name.endswith(".json") and not name.endswith(".eval.json"):
            with open(os.path.join(store, "videos", name)) as f:
                metadata = json.load(f)
            rendering = metadata["rendering"]
            spans.setdefault(metadata["worker"], []).append((rendering["started"], rendering["ended"]))
    return spans


def gaps(spans: dict[str, list[tuple[float, float]]]) -> list[float]:
    """Seconds a worker's device waited between one job's render and the next's."""
    ordered = [sorted(jobs) for jobs in spans.values()]
    return [b[0] - a[1] for jobs in ordered for a, b in zip(jobs, jobs[1:], strict=False)]


def worker_pids(log_text: str) -> dict[str, int]:
    """The supervisor's slots (`gpu0`) and the pid each has now."""
    return {slot: int(pid) for slot, pid in PID_LINE.findall(log_text)}


def gpu_holders() -> dict[int, list[str]]:
    """GPU index -> 'pid MiB' of each process holding memory on it, as nvidia-smi sees them."""
    query = ["nvidia-smi", "--format=csv,noheader,nounits"]
    buses = subprocess.run(query + ["--query-gpu=index,pci.bus_id"], capture_output=True, text=True).stdout
    index = {bus.strip(): int(i) for i, bus in (line.split(",") for line in buses.strip().splitlines())}
    apps = subprocess.run(query + ["--query-compute-apps=pid,gpu_bus_id,used_memory"], capture_output=True, text=True)
    holders: dict[int, list[str]] = {i: [] for i in index.values()}
    for line in apps.stdout.strip().splitlines():
        pid, bus, mib = (part.strip() for part in line.split(","))
        holders[index[bus]].append(f"pid {pid} {mib} MiB")
    return holders


class Fleet:
    """One `lorafleet workers` supervisor with its log."""

    def __init__(self, count: int, args, env: dict, log_path: str):
        slots = ["--cpus", str(count)] if args.device == "cpu" else ["--gpus", ",".join(map(str, range(count)))]
        self.count, self.log_path = count, log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lorafleet", "workers", *slots], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.started = time.monotonic()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout_s: float) -> float:
        deadline = self.started + timeout_s
        while len(set(re.findall(r"(\S+@\S+): READY", self.log()))) < self.count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the workers did not all get READY; log:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        return time.monotonic() - self.started

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure(count: int, args, env: dict, paths: dict, work: str) -> tuple[dict, Fleet]:
    """Run the sweep on `count` workers; returns the row and the fleet, still up."""
    env = {**env, "LORAFLEET_STORE_URL": os.path.join(work, f"store-{count}")}
    fleet = Fleet(count, args, env, os.path.join(work, f"workers-{count}.log"))
    ready_s = fleet.wait_ready(args.timeout)
    jobs_file = os.path.join(work, "sweep.jsonl")
    jobs = write_jobs(jobs_file, paths, args)
    holders = {}
    if args.device == "cuda":  # look once the workers are busy: every worker then holds its GPU
        threading.Timer(args.look_after, lambda: holders.update(gpu_holders())).start()
    submitted = time.time()  # wall clock, as the workers' log lines are stamped
    submit = lorafleet(
        "submit", jobs_file, "--batch", f"scale-{count}", "--wait", "--timeout", str(args.timeout), env=env
    )
    elapsed = time.time() - submitted
    if submit.returncode != 0:
        raise SystemExit(f"the sweep on {count} worker(s) failed:\n{submit.stdout}{submit.stderr}")
    spans = render_spans(env["LORAFLEET_STORE_URL"])
    between = gaps(spans)
    times = [end - start for v in spans.values() for start, end in v]
    row = {
        "workers": count,
        "jobs": jobs,
        "READY (s)": ready_s,
        "sweep (s)": elapsed,
        "jobs/h": jobs / elapsed * 3600,
        "jobs per worker": "/".join(str(len(v)) for _, v in sorted(spans.items())),
        "first job starts after submit (s)": min(start for v in spans.values() for start, _ in v) - submitted,
        "job (s, median)": statistics.median(times),
        "job (s, max)": max(times),
        "workers busy (% of the sweep)": sum(times) / len(spans) / elapsed * 100,
        "gap between jobs (s, max)": max(between, default=0.0),
        "gap between jobs (s, median)": statistics.median(between) if between else 0.0,
        "GPU per worker": "; ".join(f"gpu{i}: {', '.join(h) or 'none'}" for i, h in sorted(holders.items()))
        or "n/a (CPU)",
    }
    row["worker pids"] = ", ".join(f"{slot} {pid}" for slot, pid in worker_pids(fleet.log()).items())
    return row, fleet


def kill_one_mid_render(fleet: Fleet, args, env: dict, paths: dict, work: str) -> list[str]:
    """SIGKILL a worker as soon as it starts a job; the job must still end done. Returns failures."""
    env = {**env, "LORAFLEET_STORE_URL": os.path.join(work, f"store-{fleet.count}")}
    jobs_file = os.path.join(work, "kill.jsonl")
    with open(jobs_file, "w") as f:  # one longer job per worker
        for seed in range(fleet.count):
            line = {"prompt": "a killed worker's job", "seed": seed, "adapters": [paths["a1"]], "steps": args.steps * 4}
            f.write(json.dumps(line | size_fields(args)) + "\n")
    seen = len(fleet.log())
    submit = lorafleet(
        "submit", jobs_file, "--batch", "kill", "--wait", "--timeout", str(args.timeout), env=env, background=True
    )
    deadline = time.monotonic() + args.timeout
    while not (found := JOB_LINE.search(fleet.log()[seen:])) or found.group(4) != "started":
        if time.monotonic() > deadline or submit.poll() is not None:
            return ["no job of the kill batch started"]
        time.sleep(0.05)
    worker, key = found.group(2), found.group(3)
    pids = worker_pids(fleet.log())
    # A GPU worker is named after its slot (gpu0); a CPU worker after its pid (cpu-4242).
    slot = worker if worker in pids else next(s for s, pid in pids.items() if f"cpu-{pid}" == worker)
    os.kill(pids[slot], signal.SIGKILL)
    print(f"killed {slot} (pid {pids[slot]}) while it rendered {key}", file=sys.stderr, flush=True)
    output, _ = submit.communicate(timeout=args.timeout + 60)
    after = fleet.log()[seen:]
    failures = []
    if submit.returncode != 0:
        failures.append(f"the kill batch did not finish: {output[-2000:]}")
    if f"{slot} worker died (code -9); restart 1" not in after or f"{slot} worker restarted" not in after:
        failures.append(f"the supervisor did not restart {slot}")
    if not re.search(rf"@\S+: {key} rendered in ", after):
        failures.append(f"job {key}, whose worker was killed, was not rendered again")
    return failures


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    first = rows[0]
    for row in rows:
        row[f"jobs/h over {first['workers']} worker(s)"] = row["jobs/h"] / first["jobs/h"]
        row["per-worker efficiency"] = row["jobs/h"] / first["jobs/h"] * first["workers"] / row["workers"]
    print("| " + " | ".join(["metric", *(f"{row['workers']} worker(s)" for row in rows)]) + " |")
    print("|" + "---|" * (len(rows) + 1))
    for metric in first:
        if metric != "workers":
            cells = [row[metric] for row in rows]
            print("| " + " | ".join([metric, *(_cell(c) for c in cells)]) + " |")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["tiny", "2b", "5b"], help="default: tiny on the CPU, 2b on GPUs")
    parser.add_argument("--workers", nargs="+", default=["1", "all"], help='worker counts to compare; "all" GPUs')
    parser.add_argument("--steps", type=int, help="denoising steps per job (default: 4 on GPUs, 2 on the CPU)")
    parser.add_argument("--frames", type=int, help="frames per video (default: the model's)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds a sweep or a worker start may take")
    parser.add_argument("--look-after", type=float, default=20, help="seconds into a sweep to ask nvidia-smi")
    parser.add_argument("--work", help="folder for the model, stores and logs (default: a temporary one)")
    args = parser.parse_args()
    args.model = args.model or ("tiny" if args.device == "cpu" else "2b")
    args.steps = args.steps or (2 if args.device == "cpu" else 4)
    if args.device == "cuda":
        gpus = len(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip().splitlines())
    else:
        gpus = os.cpu_count()
    counts = [gpus if c == "all" else int(c) for c in args.workers]
    work = args.work or tempfile.mkdtemp(prefix="fleet-scaling-")
    started = time.monotonic()
    paths = write_model(args, work)
    print(f"model {args.model} written in {time.monotonic() - started:.1f}s: {paths['model']}", file=sys.stderr)

    failures = []
    rows = []
    with RedisServer() as redis:
        env = {
            **os.environ,
            "LORAFLEET_REDIS_URL": redis.url,
            "LORAFLEET_MODEL": paths["model"],
            "LORAFLEET_ADAPTER_CACHE_DIR": os.path.join(work, "adapter-cache"),
            "LORAFLEET_LEASE_S": "10",  # a killed worker's job goes back to the queue 10 s after its last refresh
        }
        for i, count in enumerate(counts):
            row, fleet = measure(count, args, env, paths, work)
            rows.append(row)
            print(f"{count} worker(s): {json.dumps(row)}", file=sys.stderr, flush=True)
            try:
                if i == len(counts) - 1 and count > 1:
                    failures += kill_one_mid_render(fleet, args, env, paths, work)
            finally:
                fleet.stop()
            if args.device == "cuda" and len({h for h in row["GPU per worker"].split("; ") if "none" not in h}) < count:
                failures.append(f"{count} worker(s) did not each hold a GPU: {row['GPU per worker']}")

    import torch

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print_table(
        rows,
        f"fleet scaling on {where} ({gpus} on this host); model {args.model}, {rows[0]['jobs']}-job sweep, "
        f"{args.steps} steps, "
        + (
            f"{args.frames or '?'}x{args.height or '?'}x{args.width or '?'}"
            if args.frames or args.height
            else "the model's default size"
        ),
    )
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures and len(counts) > 1 and counts[-1] > 1:
        print("\nkilled worker: restarted by the supervisor, its job finished: yes")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
