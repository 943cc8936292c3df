"""The README's "From the demo to your own fleet", line by line, piped, as a new user runs it."""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.helpers import read_manifest

pytestmark = pytest.mark.e2e


def section_lines() -> list[str]:
    """The commands of the section's code block, without their comments."""
    readme = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"## From the demo to your own fleet.*?```\n(.*?)```", readme, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def run(line: str, env: dict, cwd, timeout: float = 240) -> tuple[int, str, float]:
    """Run one line in bash, piped; returns its exit code, its output, and when (seconds after
    start) a 'no live worker' warning first appeared in it, or -1."""
    started = time.monotonic()
    process = subprocess.Popen(
        ["bash", "-c", line], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output, warned_at = [], -1.0
    for text in process.stdout:
        output.append(text)
        if warned_at < 0 and "no live worker serves queue" in text:
            warned_at = time.monotonic() - started
    return process.wait(timeout=timeout), "".join(output), warned_at


@pytest.mark.timeout(900)  # a fresh venv installed from scratch, beside other tests
def test_from_the_demo_to_your_own_fleet(tmp_path):
    """In the state `make demo` leaves (its ./demo and ./results), with port 6379 taken by another
    Redis, every line as written, with the exit code the README promises; nothing left untracked."""
    lines = section_lines()
    assert lines[:4] == [
        "export PATH=$PWD/.venv/bin:$PATH",
        'eval "$(lorafleet redis)"',
        "export LORAFLEET_MODEL=$PWD/demo/model",
        "export LORAFLEET_EVAL_CLIP=$PWD/demo/clip",
    ]
    commands = lines[4:]
    assert [c.split()[1] for c in commands] == [
        "submit", "worker", "wait", "submit", "sweep", "sweep", "batches", "%1", "redis",
    ]  # fmt: skip
    # A checkout after `make demo`: its venv, its examples, and the demo run here (./demo, ./results).
    shutil.copytree(os.path.join(REPO, "examples"), tmp_path / "examples")
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), tmp_path / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    demo = subprocess.run(
        ["bash", "-c", ".venv/bin/lorafleet demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert demo.returncode == 0 and "demo done" in demo.stdout, demo.stdout[-2000:] + demo.stderr[-2000:]
    with contextlib.ExitStack() as stack:
        stack.enter_context(port_6379_taken())
        setup = subprocess.run(
            ["bash", "-c", "\n".join(lines[:4]) + "\nenv -0"], cwd=tmp_path, env=env, capture_output=True, timeout=60
        )
        assert setup.returncode == 0, setup.stderr
        env = dict(item.split("=", 1) for item in setup.stdout.decode().split("\0") if "=" in item)
        assert re.fullmatch(r"redis://:[\w-]{20,}@127\.0\.0\.1:\d+/0", env["LORAFLEET_REDIS_URL"])  # a generated password
        assert not env["LORAFLEET_REDIS_URL"].endswith(":6379/0")  # not someone else's Redis
        stack.callback(run, "lorafleet redis --stop", env, tmp_path)  # whatever happens below

        code, output, warned_at = run(commands[0], env, tmp_path)
        assert code == 7, output
        assert 0 <= warned_at <= 15, output  # said within seconds, not after the timeout
        assert "Start one with `lorafleet worker --device cpu`" in output
        assert "follow them with `lorafleet wait first`" in output

        worker = subprocess.Popen(["bash", "-c", f"exec {commands[1].rstrip('&').strip()}"], env=env, cwd=tmp_path)
        stack.callback(lambda: worker.poll() is None and (worker.kill(), worker.wait()))
        log = tmp_path / "demo" / "worker.log"
        deadline = time.monotonic() + 120
        while not (log.exists() and "READY" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "broker connected" in log.read_text()

        code, output, _ = run(commands[2], env, tmp_path)
        assert code == 0, output
        manifest = read_manifest(tmp_path / "results" / "batches" / "first" / "manifest.jsonl")
        assert len(manifest) == 4 and all(entry["status"] == "done" for entry in manifest)
        for entry in manifest:  # piped: one plain line per job, with its full video path on that line
            assert re.search(rf"^done +{entry['key'][:12]} .*{re.escape(entry['video'])}$", output, re.M), output

        code, output, _ = run(commands[3], env, tmp_path)  # the demo's jobs: rendered by the demo already
        assert code == 0 and "5 jobs, 0 enqueued, 5 already in the store" in output, output

        code, output, _ = run(commands[4], env, tmp_path)
        assert code == 0, output
        assert "no earlier batch of sweep demo-sweep has a report: nothing to compare with" in output
        assert "evaluating 10 video(s) on the fleet" in output and f"CLIP: {tmp_path}/demo/clip" in output
        code, output, _ = run(commands[5], env, tmp_path)
        assert code == 0, output
        assert "comparing with demo-sweep-1" in output and "moved since demo-sweep-1" in output
        assert "evaluations: all 10 videos already evaluated by this evaluator" in output

        missing = commands[5].replace("demo-sweep-2", "demo-sweep-3").replace("latest", "no-such-batch")
        code, output, _ = run(missing, env, tmp_path)  # last night's batch is missing: a warning, not a crash
        assert code == 0, output
        assert "warning: batch no-such-batch has no report in the store" in output and "Traceback" not in output

        code, output, _ = run(commands[6], env, tmp_path)
        assert code == 0, output
        listed = [line.split()[0] for line in output.splitlines()]
        # oldest first: the demo's batch, first, the resubmit of the demo's jobs, the three sweeps
        assert len(listed) == 6 and listed[1] == "first", output
        assert listed[3:] == ["demo-sweep-1", "demo-sweep-2", "demo-sweep-3"], output
        assert all(" sweep " in line for line in output.splitlines()[3:])

        worker.terminate()  # `kill %1`: the worker finishes its job and exits 0
        assert worker.wait(timeout=60) == 0
        code, output, _ = run(commands[8], env, tmp_path)
        assert code == 0 and "stopped the redis-server of demo/redis" in output, output
    assert sorted(os.listdir(tmp_path)) == [".venv", "demo", "examples", "results"]  # nothing else left behind


@contextlib.contextmanager
def port_6379_taken():
    """Port 6379 in use, as on a machine that runs its own Redis: that one, or a listener of ours."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        yield
        return
    except OSError:
        pass
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 6379))
        listener.listen()
        yield
