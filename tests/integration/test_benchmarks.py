"""The benchmarks run and keep lorafleet's promises on the CPU; their timings count only on a GPU."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def table_of(output: str) -> dict[str, dict[str, str]]:
    """A printed markdown table as {metric: {column: cell}}."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines() if line.startswith("|")
    ]
    header, body = rows[0], rows[2:]
    return {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in body}


def test_variant_switch_benchmark_prints_its_table_with_no_drift_and_no_recompiles():
    script = os.path.join(REPO, "benchmarks", "variant_switch.py")
    command = [sys.executable, script, "--models", "tiny", "--drift-switches", "50", "--compile", "--compile-backend", "aot_eager"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    table = table_of(result.stdout)
    lorafleet = ["tiny lorafleet", "tiny lorafleet K=2", "tiny lorafleet host"]
    assert set(table["switch (ms)"]) == {"tiny diffusers", *lorafleet}
    for column in lorafleet:
        assert float(table["drift after N switches (max abs)"][column]) == 0
        assert int(table["recompiles after the first compile"][column]) == 0
    assert int(table["recompiles after the first compile"]["tiny diffusers"]) >= 1  # what the engine avoids


def test_evaluation_cost_benchmark_evaluates_every_video():
    script = os.path.join(REPO, "benchmarks", "evaluation_cost.py")
    command = [sys.executable, script, "--clips", "none", "tiny", "--videos", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    table = table_of(result.stdout)
    assert set(table) == {"none", "tiny"}
    assert all(float(row["all videos (s)"]) > 0 for row in table.values())


def test_queue_scale_benchmark_prints_its_figures():
    script = os.path.join(REPO, "benchmarks", "queue_scale.py")
    command = [sys.executable, script, "--sizes", "100", "--overhead-jobs", "5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    table = table_of(result.stdout)
    assert set(table) == {"submit (s)", "peak MB", "poll (s)", "status (s)"}
    assert all(float(row["100 jobs"]) > 0 for row in table.values())
    assert "worker overhead per job (5 jobs, one CPU worker): median" in result.stdout
