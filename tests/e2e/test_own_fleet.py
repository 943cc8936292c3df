"""The README's "From the demo to your own fleet", line by line, piped, as a new user runs it."""

import os
import re
import shutil
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


def test_from_the_demo_to_your_own_fleet(tiny, redis_url, tmp_path):
    lines = section_lines()
    assert lines[:5] == [
        "export PATH=$PWD/.venv/bin:$PATH",
        "redis-server --daemonize yes --appendonly yes",
        "export LORAFLEET_REDIS_URL=redis://127.0.0.1:6379/0",
        "export LORAFLEET_MODEL=$PWD/demo/model",
        "export LORAFLEET_EVAL_CLIP=$PWD/demo/clip",
    ]
    # What those five lines give a user, here: lorafleet on PATH, a Redis, the demo's model and CLIP in ./demo.
    shutil.copytree(os.path.join(REPO, "examples"), tmp_path / "examples")
    shutil.copytree(os.path.dirname(tiny["model"]), tmp_path / "demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env.update(
        PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}",
        PYTHONPATH=REPO,
        LORAFLEET_REDIS_URL=redis_url,
        LORAFLEET_MODEL=str(tmp_path / "demo" / "model"),
        LORAFLEET_EVAL_CLIP=str(tmp_path / "demo" / "clip"),
        LORAFLEET_STORE_URL=str(tmp_path / "results"),
        LORAFLEET_ADAPTER_CACHE_DIR=str(tmp_path / "adapter-cache"),
    )
    commands = lines[5:]
    assert [c.split()[1] for c in commands] == ["submit", "worker", "wait", "sweep", "sweep", "batches"]

    code, output, warned_at = run(commands[0], env, tmp_path)
    assert code == 7, output
    assert 0 <= warned_at <= 15, output  # said within seconds, not after the timeout
    assert "Start one with `lorafleet worker --device cpu`" in output
    assert "follow them with `lorafleet wait first`" in output

    worker = subprocess.Popen(["bash", "-c", f"exec {commands[1].rstrip('&').strip()}"], env=env, cwd=tmp_path)
    try:
        log = tmp_path / "worker.log"
        deadline = time.monotonic() + 120
        while not (log.exists() and "READY" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "broker connected" in log.read_text()

        code, output, _ = run(commands[2], env, tmp_path)
        assert code == 0, output
        manifest = read_manifest(tmp_path / "results" / "batches" / "first" / "manifest.jsonl")
        assert len(manifest) == 5 and all(entry["status"] == "done" for entry in manifest)
        for entry in manifest:  # piped: one plain line per job, with its full video path on that line
            assert re.search(rf"^done +{entry['key'][:12]} .*{re.escape(entry['video'])}$", output, re.M), output

        code, output, _ = run(commands[3], env, tmp_path)
        assert code == 0, output
        assert "no earlier batch of sweep demo-sweep has a report: nothing to compare with" in output
        assert "evaluating 10 video(s) on the fleet" in output and f"CLIP: {tmp_path}/demo/clip" in output
        code, output, _ = run(commands[4], env, tmp_path)
        assert code == 0, output
        assert "comparing with demo-sweep-1" in output and "moved since demo-sweep-1" in output
        assert "evaluations: all 10 videos already evaluated by this evaluator" in output

        missing = commands[4].replace("demo-sweep-2", "demo-sweep-3").replace("latest", "no-such-batch")
        code, output, _ = run(missing, env, tmp_path)  # last night's batch is missing: a warning, not a crash
        assert code == 0, output
        assert "warning: batch no-such-batch has no report in the store" in output and "Traceback" not in output

        code, output, _ = run(commands[5], env, tmp_path)
        assert code == 0, output
        listed = [line.split()[0] for line in output.splitlines()]
        assert listed == ["first", "demo-sweep-1", "demo-sweep-2", "demo-sweep-3"], output
        assert all(" sweep " in line for line in output.splitlines()[1:])
        assert "first" in output.splitlines()[0] and "5 done" in output.splitlines()[0]

        code, output, _ = run("lorafleet --version", env, tmp_path)
        assert code == 0 and output.startswith("lorafleet, version ")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
