"""`lorafleet demo` (`make demo`): the whole flow on one machine, with nothing but this repository.

Builds the tiny model and its two adapters into ./demo (once), starts a private redis-server
(unless LORAFLEET_REDIS_URL is set) and one CPU worker, submits examples/prompts.jsonl with
--wait, prints where the videos are, then stops what it started.
"""

import os
import subprocess
import sys
import time
from contextlib import ExitStack

from rich.console import Console

from common.errors import LorafleetError
from common.redis_server import RedisServer

DEMO_DIR = "demo"
EXAMPLES = os.path.join("examples", "prompts.jsonl")
WORKER_START_TIMEOUT_S = 300


def _start_worker(env: dict, log_path: str) -> subprocess.Popen:
    """Start `lorafleet worker --device cpu` and wait until it says READY."""
    log = open(log_path, "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "worker", "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(log_path) as f:
            text = f.read()
        if "ready." in text:  # Celery's own line: the worker consumes from now on
            return worker
        if worker.poll() is not None:
            raise LorafleetError(f"the worker exited at start (code {worker.returncode}); its log:\n{text[-2000:]}")
        time.sleep(0.2)
    worker.kill()
    raise LorafleetError(f"the worker was not ready within {WORKER_START_TIMEOUT_S}s; see {log_path}")


def _stop(worker: subprocess.Popen) -> None:
    worker.terminate()  # warm shutdown: Celery finishes the current job first
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def run_demo(console: Console) -> int:
    """Run the demo; returns the exit code of the submit."""
    model_dir = os.path.join(DEMO_DIR, "model")
    if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        console.print(f"building the tiny random-weight model into {DEMO_DIR}/ ...")
        from workers.tiny_model import write_tiny_model

        write_tiny_model(DEMO_DIR)
    env = {**os.environ, "LORAFLEET_MODEL": os.path.abspath(model_dir)}
    env.setdefault("LORAFLEET_STORE_URL", "./results")
    with ExitStack() as stack:
        if "LORAFLEET_REDIS_URL" not in os.environ:
            redis = stack.enter_context(RedisServer())
            env["LORAFLEET_REDIS_URL"] = redis.url
            console.print(f"started a private redis-server at {redis.url}")
        log_path = os.path.join(DEMO_DIR, "worker.log")
        console.print(f"starting one CPU worker (log: {log_path}) ...")
        worker = _start_worker(env, log_path)
        stack.callback(_stop, worker)
        code = subprocess.call([sys.executable, "-m", "lorafleet", "submit", EXAMPLES, "--wait"], env=env)
    store = env["LORAFLEET_STORE_URL"]
    if code == 0:
        console.print(f"[green]demo done:[/] videos in {store}/videos/, manifests in {store}/batches/")
    else:
        console.print(f"[red]demo: some jobs failed[/] (exit {code}); see {DEMO_DIR}/worker.log")
    return code
