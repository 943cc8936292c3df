"""`lorafleet workers`: one supervised worker process per GPU of this host (or N on its CPU).

Signal handlers only set flags. Each SIGTERM (or Ctrl-C) is passed on to every worker: the first
makes it finish its current job and exit, a second makes it exit at once, and its job is delivered
again. A worker that dies on its own is restarted, with a back-off.
"""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from common.errors import ExitCode, LorafleetError
from common.retry import backoff

log = logging.getLogger("lorafleet.workers")
RESTART_CAP_S = 30  # the longest wait before a dead worker is started again
MODEL_LOAD_TRIES = 3  # a model that fails to load this many times in a row is a configuration error


def list_gpus(spec: str) -> list[int]:
    """GPU indices from `all` (every GPU nvidia-smi lists) or a list such as `0,2`."""
    if spec != "all":
        try:
            return sorted({int(part) for part in spec.split(",") if part.strip()})
        except ValueError:
            raise LorafleetError(f'--gpus: expected "all" or indices like 0,2, got "{spec}"') from None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        raise LorafleetError(
            "--gpus all: nvidia-smi lists no GPU here; name them (--gpus 0,1) or run `lorafleet worker --device cpu`"
        ) from None
    return [int(line) for line in out.split() if line.strip().isdigit()]


def worker_slots(gpus: list[int], cpus: int = 0) -> dict[str, list[str]]:
    """What each supervised worker is started with, by the name the supervisor's log gives it:
    `gpuN` pinned to GPU N, or `cpuN` for the N-th CPU worker."""
    slots = {f"gpu{gpu}": ["--gpu", str(gpu)] for gpu in gpus}
    slots.update({f"cpu{n}": ["--device", "cpu"] for n in range(cpus)})
    return slots


def spawn_worker(worker_args: list[str], env: dict | None = None, log_path: str | None = None) -> subprocess.Popen:
    """Start `lorafleet worker ARGS` (`python -m lorafleet worker ARGS`) in its own session (signals
    reach it only when passed on)."""
    command = [sys.executable, "-m", "lorafleet", "worker", *worker_args]
    with open(log_path, "w") if log_path else contextlib.nullcontext() as output:  # the child keeps its own copy
        return subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT if output else None, start_new_session=True
        )


def wait_until_ready(process: subprocess.Popen, log_path: str, timeout_s: float = 300) -> None:
    """Wait for a worker started with `spawn_worker(..., log_path)` to consume; raise if it dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(log_path) as f:
            text = f.read()
        if " ready." in text:  # Celery's own line: the worker consumes from now on
            return
        if process.poll() is not None:
            raise LorafleetError(f"the worker exited at start (code {process.returncode}); its log:\n{text[-3000:]}")
        time.sleep(0.1)
    process.kill()
    raise LorafleetError(f"the worker was not ready within {timeout_s:.0f}s; see {log_path}")


def stop_worker(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM a worker (it finishes its current job first), killing it after `timeout_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def run_workers(slots: dict[str, list[str]], worker_args: list[str], env: dict | None = None) -> int:
    """Run `lorafleet worker SLOT_ARGS WORKER_ARGS` for each slot of `worker_slots` (in `env`) until
    told to stop; returns the exit code."""
    if not slots:
        raise LorafleetError("no GPUs to start workers on")
    env = dict(os.environ if env is None else env)
    if "OMP_NUM_THREADS" not in env:
        # Each worker's torch would start a thread per core: N workers' threads then contend for the
        # cores, and each small CPU op (an adapter's checks, frame conversion) waits on all of them
        # (measured on 2 H200s: an adapter's first use 14 s instead of 0.1 s). Share the cores out.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(slots)))
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    ports = {}
    if env.get("LORAFLEET_METRICS_PORT"):  # one port each: the base port and the ones after it
        ports = {slot: str(int(env["LORAFLEET_METRICS_PORT"]) + i) for i, slot in enumerate(slots)}

    def start(slot: str) -> subprocess.Popen:
        port = {"LORAFLEET_METRICS_PORT": ports[slot]} if slot in ports else {}
        return spawn_worker([*slots[slot], *worker_args], {**env, **port})

    workers = {slot: start(slot) for slot in slots}
    restarts = dict.fromkeys(slots, 0)
    load_failures = dict.fromkeys(slots, 0)  # in a row: a model that never loads is not retried forever
    exit_code = ExitCode.OK
    restart_at: dict[str, float] = {}  # slot of a dead worker -> when it starts again
    forwarded = 0
    log.info(
        "started %d worker(s), %s CPU thread(s) each: %s",
        len(slots),
        env["OMP_NUM_THREADS"],
        ", ".join(f"{slot} (pid {p.pid})" for slot, p in workers.items()),
    )
    while workers or restart_at:
        if len(signals) > forwarded:
            forwarded = len(signals)
            restart_at.clear()  # told to stop: a dead worker stays dead
            log.info("passing SIGTERM %d to %d worker(s)", forwarded, len(workers))
            for process in workers.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)  # a worker's second SIGTERM makes it exit at once
        for slot, process in list(workers.items()):
            code = process.poll()
            if code is None:
                continue
            del workers[slot]
            if signals:
                log.info("%s worker exited (code %s)", slot, code)
                continue
            load_failures[slot] = load_failures[slot] + 1 if code == ExitCode.MODEL_LOAD_FAILED else 0
            if load_failures[slot] >= MODEL_LOAD_TRIES:
                log.error(
                    "%s: the model failed to load %d times in a row (the worker's reason is above): "
                    "a configuration error, not a crash; stopping every worker",
                    slot,
                    MODEL_LOAD_TRIES,
                )
                exit_code = ExitCode.MODEL_LOAD_FAILED
                signals.append(signal.SIGTERM)  # stop the others the way a user's SIGTERM does
                continue
            delay = 1 + backoff(restarts[slot], cap=RESTART_CAP_S)
            restarts[slot] += 1
            log.warning("%s worker died (code %s); restart %d in %.0fs", slot, code, restarts[slot], delay)
            restart_at[slot] = time.monotonic() + delay
        for slot, when in list(restart_at.items()):
            if time.monotonic() >= when:  # waiting here, not in a sleep, keeps SIGTERM passed on at once
                del restart_at[slot]
                workers[slot] = start(slot)
                log.info("%s worker restarted (pid %d)", slot, workers[slot].pid)
        time.sleep(0.2)
    log.info("all workers stopped; %d restart(s)", sum(restarts.values()))
    return exit_code
