"""Shared compile artifacts between worker processes: one compiles with inductor and shares its
artifacts through the store, a fresh one loads them instead of compiling; without the fleet's secret
nothing is shared. Each compile is a fresh process (minutes of inductor on the CPU in all)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

COMPILE_ONCE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from torch._dynamo.utils import counters
from common.settings import Settings
from workers.renderer import Renderer
settings = Settings(adapter_cache_dir=sys.argv[2], store_url=sys.argv[3], compile=True)
renderer = Renderer(sys.argv[1], "cpu", settings, "fresh")
print("RESULT " + json.dumps(dict(counters["inductor"])))
"""


def compile_in_a_fresh_process(tiny, tmp_path, store, name: str, secret: str | None = "fleet-secret") -> dict:
    """A worker process compiling the tiny transformer with inductor, with an empty local cache."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}")}
    env.pop("LORAFLEET_COMPILE_CACHE_SECRET", None)
    if secret is not None:
        env["LORAFLEET_COMPILE_CACHE_SECRET"] = secret
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ONCE, tiny["model"], str(tmp_path / "adapters"), str(store)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    counters = json.loads(done.stdout.split("RESULT ")[-1])
    return {"counters": counters, "log": done.stderr}


def test_a_fresh_worker_compiles_from_the_artifacts_another_shared(tiny, tmp_path):
    store = tmp_path / "store"
    first = compile_in_a_fresh_process(tiny, tmp_path, store, "first")
    assert "from scratch, shared" in first["log"] and first["counters"].get("fxgraph_cache_miss", 0) >= 1
    (entry,) = (store / "compile-cache").glob("*.json")
    described = json.loads(entry.read_text())
    assert described["identity"]["precision"] == "bf16" and described["identity"]["size"] == [9, 16, 16]
    assert (store / "compile-cache" / f"{entry.stem}.bin").stat().st_size == described["bytes"]
    second = compile_in_a_fresh_process(tiny, tmp_path, store, "second")
    assert "with the fleet's shared artifacts" in second["log"]
    assert second["counters"].get("fxgraph_cache_miss", 0) == 0 and second["counters"]["fxgraph_cache_hit"] >= 1
    # Without the fleet's secret nothing is shared: the entry is there, and not loaded.
    third = compile_in_a_fresh_process(tiny, tmp_path, store, "third", secret=None)
    assert "not shared (artifacts are code: set LORAFLEET_COMPILE_CACHE_SECRET" in third["log"]
    assert "from scratch, not shared" in third["log"] and third["counters"].get("fxgraph_cache_miss", 0) >= 1


