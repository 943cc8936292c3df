"""The README's quickstart, run as a user runs it."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from producer.report.page import suggested_text
from tests.conftest import REPO
from tests.helpers import REPORT_PROBE, decode_video, probe_page, read_manifest

pytestmark = pytest.mark.e2e


def quickstart_commands() -> list[str]:
    """The `make …` commands of the README's quickstart block."""
    readme = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"## Quickstart.*?```\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("make ")]


def test_readme_quickstart_lists_demo_and_test():
    assert quickstart_commands() == ["make demo", "make test"]


@pytest.mark.timeout(900)  # a fresh venv installed from scratch, beside other tests
def test_make_demo_ends_with_decodable_videos_from_a_fresh_install_without_apt(tmp_path):
    """`make install` into a new venv, then `make demo`, on a machine whose apt is busy (every call
    fails as a held lock fails): neither needs apt or a browser."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env["LORAFLEET_STORE_URL"] = str(tmp_path / "results")  # the demo's ./results, kept out of the checkout
    busy = tmp_path / "busy-apt"
    busy.mkdir()
    for tool in ("apt-get", "apt"):
        (busy / tool).write_text(
            f"#!/bin/sh\necho \"$0 $*\" >> {tmp_path}/apt-calls\n"
            "echo 'E: Could not get lock /var/lib/dpkg/lock-frontend' >&2\nexit 100\n"
        )
        (busy / tool).chmod(0o755)
    env["PATH"] = f"{busy}:{env['PATH']}"
    venv = f"VENV={tmp_path / 'venv'}"
    installed = subprocess.run(["make", "install", venv], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert "installing torch==" in installed.stdout and "Collecting" in installed.stdout  # progress, not silence
    result = subprocess.run(["make", "demo", venv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (tmp_path / "apt-calls").exists()
    said = result.stdout + result.stderr  # the demo's own words, not torchao's warnings or progress bars
    assert "torchao" not in said and "Failed to load" not in said and "Writing model shards" not in said
    assert "demo done: videos in" in result.stdout
    (manifest,) = glob.glob(str(tmp_path / "results" / "batches" / "*" / "manifest.jsonl"))
    entries = read_manifest(manifest)
    assert len(entries) == 5 and all(e["status"] == "done" for e in entries)
    for entry in entries:
        frames = decode_video(entry["video"])
        assert frames.shape[0] in (9, 17) and frames.shape[-1] == 3


def run_demo(tmp_path, example: str, *args: str) -> subprocess.CompletedProcess:
    """`lorafleet demo ARGS` in a fresh folder holding examples/EXAMPLE, as a user runs it from a
    checkout (no LORAFLEET_ setting of this environment; the store in ./results)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env["LORAFLEET_STORE_URL"] = str(tmp_path / "results")
    os.makedirs(tmp_path / "examples", exist_ok=True)
    with open(os.path.join(REPO, "examples", example)) as f:
        (tmp_path / "examples" / example).write_text(f.read())
    return subprocess.run(
        [sys.executable, "-m", "lorafleet", "demo", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_the_image_to_video_demo_renders_examples_i2v(tmp_path):
    result = run_demo(tmp_path, "i2v.jsonl", "--kind", "i2v")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "demo" / "i2v" / "images" / "sunset.png")  # the input images it wrote
    (manifest,) = glob.glob(str(tmp_path / "results" / "batches" / "*" / "manifest.jsonl"))
    entries = read_manifest(manifest)
    assert [e["status"] for e in entries] == ["done"] * 3
    assert all(decode_video(e["video"]).shape == (9, 16, 16, 3) for e in entries)


def test_the_demo_runs_a_draft_night_with_a_draft_worker_beside_the_exact_one(tmp_path):
    """`lorafleet demo --sweep examples/sweep_draft.yaml` as the README shows it: the spec's `draft`
    alias is defined by the demo (the tiny model with TaylorSeer) and served by a worker of its own."""
    result = run_demo(tmp_path, "sweep_draft.yaml", "--sweep", "examples/sweep_draft.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "starting a CPU worker for model draft (log: demo/demo-worker-draft.log)" in result.stdout
    (folder,) = glob.glob(str(tmp_path / "results" / "batches" / "draft-night-*"))
    html = open(os.path.join(folder, "report.html")).read()
    assert "Confirmed exactly" in html and "class='cell exact'" in html and "class='cell draft'" in html
    report = json.load(open(os.path.join(folder, "report.json")))
    for cell in report["cells"]:  # each rendered by the worker of its tier
        meta = json.load(open(tmp_path / "results" / "videos" / f"{cell['key']}.json"))
        assert (meta["cache"] or {}).get("hook") == (None if cell.get("tier") == "exact" else "taylorseer")
    seen = probe_page(os.path.join(folder, "report.html"), REPORT_PROBE, str(tmp_path / "profile"), 5000)
    assert seen["notices"][0] == "notice draft"  # first, before any number is read as exact
    (draft,), (exact,) = report["sets"], report["confirmed"]
    assert seen["suggested"] == [suggested_text(draft)] and seen["confirmed"] == [suggested_text(exact)]


def test_the_demo_sweeps_decide_refine_and_say_why(tmp_path):
    """The README's default and refining sweeps on the demo's own tiny model, as a user runs them
    after `make demo`: each adapter set's suggestion lies strictly inside the range swept, the
    refining sweep adds scales, marks them and says why it stopped, with the output the README shows,
    and a browser shows all of it at the top of the pages."""
    default = run_demo(tmp_path, "sweep.yaml", "--sweep", "examples/sweep.yaml")
    assert default.returncode == 0, default.stdout[-3000:] + default.stderr[-3000:]
    refining = run_demo(tmp_path, "sweep_refine.yaml", "--sweep", "examples/sweep_refine.yaml")
    assert refining.returncode == 0, refining.stdout[-3000:] + refining.stderr[-3000:]
    (default_folder,) = glob.glob(str(tmp_path / "results" / "batches" / "demo-sweep-*"))
    (refine_folder,) = glob.glob(str(tmp_path / "results" / "batches" / "refining-*"))
    report = json.load(open(os.path.join(default_folder, "report.json")))
    assert "temporal SSIM" in report["rule"] and not report["clip"]  # the demo sets no (random) CLIP
    for s in report["sets"]:
        assert s["suggested"] is not None and 0 < s["suggested"] < max(s["scales"]), s
    # 2 prompts × 1 seed: too few pairs to tell the suggestion from the scale above it, and it says so
    assert all([n["kind"] for n in s["notices"]] == ["indistinguishable"] for s in report["sets"])

    (refined,) = json.load(open(os.path.join(refine_folder, "report.json")))["sets"]
    assert refined["refinement"]["rounds"] and refined["refinement"]["said"].startswith("stopped: ")
    assert 0 < refined["suggested"] < 1
    readme = open(os.path.join(REPO, "README.md")).read()
    shown = re.search(r"\$ make sweep SWEEP=examples/sweep_refine.yaml\n(.*?)```", readme, re.S).group(1)
    printed = [line for line in shown.splitlines() if line.startswith(("refining, round", "refined: "))]
    assert printed and all(line in refining.stdout.splitlines() for line in printed), printed  # as it printed them
    said = re.search(r"the report suggests (\S+) for both\nsets", readme).group(1)  # the default sweep's, in the README
    assert [f"{s['suggested']:g}" for s in report["sets"]] == [said, said]

    seen = probe_page(os.path.join(default_folder, "report.html"), REPORT_PROBE, str(tmp_path / "profile"), 5000)
    assert seen["suggested"] == [f"{s['suggested']:g}" for s in report["sets"]]
    assert seen["notices"] == ["indistinguishable"] * 4  # each set's, at the top and in its section
    seen = probe_page(os.path.join(refine_folder, "report.html"), REPORT_PROBE, str(tmp_path / "profile"), 5000)
    assert seen["suggested"] == [f"{refined['suggested']:g}"]
    said = f"Refined in {len(refined['refinement']['rounds'])} round(s)"
    assert len(seen["refinement"]) == 2 and all(text.startswith(said) for text in seen["refinement"])
    assert seen["refined"] == [f"refined, round {n + 1}" for n in range(len(refined["refinement"]["rounds"]))]
