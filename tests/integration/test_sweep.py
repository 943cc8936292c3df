"""A nightly sweep on the tiny model with real Redis and workers, and its report in a real browser."""

import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from common.evaluation import ssim
from producer.report import confirm_scales, refine_scale
from producer.report.page import suggested_text
from tests.conftest import REPO, lorafleet
from tests.helpers import CHROMIUM_FLAGS, REPORT_PROBE, chromium, decode_video, probe_page, render_records

pytestmark = pytest.mark.integration


@pytest.fixture
def sweep_spec(tmp_path, tiny) -> str:
    spec = {
        "name": "nightly",
        "prompts": ["a cat walks along the beach", "a dog runs across a field"],
        "adapter_sets": [[tiny["style"]], [{"uri": tiny["style"], "weight": 0.8}, tiny["subject"]]],
        "lora_scales": "0:1:0.5",
        "seeds": [1],
        "render": {"steps": 20, "height": 32, "width": 32},
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(spec))
    return str(path)


def demo_folder(tmp_path, tiny) -> str:
    """A folder as `make demo` leaves one (demo/adapters/<name>: the tiny model's), where the README's
    example specs run as written: they name the demo's adapters relative to it."""
    shutil.copytree(os.path.dirname(tiny["style"]), tmp_path / "demo" / "adapters")
    return str(tmp_path)


def example(name: str) -> str:
    """An example spec's path, checked to be shown word for word in the README or the sweeps how-to."""
    path = os.path.join(REPO, "examples", name)
    shown = [open(os.path.join(REPO, page)).read() for page in ("README.md", "docs/how-to/sweeps.md")]
    assert any(open(path).read() in text for text in shown), f"the docs show {name} otherwise"
    return path


def report_cells(store: str, batch: str) -> tuple[str, dict]:
    html = open(os.path.join(store, "batches", batch, "report.html")).read()
    return html, json.load(open(os.path.join(store, "batches", batch, "report.json")))


def clip_score_of(video: np.ndarray, prompt: str, clip_dir: str) -> float:
    """CLIPScore as the report defines it, computed here from the decoded video with transformers:
    100 × max(0, cosine(prompt, frame)) over 8 frames evenly spaced from the first to the last."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    frames = [video[i] for i in np.linspace(0, len(video) - 1, min(8, len(video))).round().astype(int)]
    inputs = processor(text=[prompt], images=frames, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    text = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    images = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    return float((images @ text.T).clamp(min=0).mean() * 100)


def test_a_sweep_evaluates_every_cell_and_reports_numbers_from_the_videos(fleet_env, start_worker, sweep_spec, tiny):
    env = {**fleet_env, "LORAFLEET_EVAL_CLIP": tiny["clip"]}
    start_worker(env)
    first = lorafleet("sweep", sweep_spec, "--batch", "night1", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    # 12 cells, 10 renders: at lora_scale 0 both adapter sets are the base model, one key per prompt.
    assert "sweep night1: 12 cells, 10 enqueued" in first.stdout
    assert "evaluating 10 video(s) on the fleet (0 already evaluated)" in first.stdout
    store = fleet_env["LORAFLEET_STORE_URL"]
    html, report = report_cells(store, "night1")
    cells = report["cells"]
    assert len(cells) == 12 and html.count("<video class='cell'") == 12 + 8  # the grids, then sets side by side
    folder = os.path.join(store, "batches", "night1")
    for link in re.findall(r"href='([^']+\.mp4)'", html):
        assert decode_video(os.path.normpath(os.path.join(folder, link))).shape == (9, 32, 32, 3)
    assert os.path.getsize(os.path.join(folder, "plots", "set0.png")) > 0

    videos = {c["key"]: decode_video(os.path.join(store, "videos", f"{c['key']}.mp4")) for c in cells}
    for cell in cells:
        evaluation = json.load(open(os.path.join(store, "videos", f"{cell['key']}.eval.json")))
        assert evaluation["evaluator"] == {"version": 1, "clip": tiny["clip"]}
        numbers = cell["numbers"]
        assert numbers["clip_score"] == pytest.approx(
            clip_score_of(videos[cell["key"]], cell["prompt_text"], tiny["clip"]), abs=1e-3
        )
        assert -1 <= numbers["clip_consistency"] <= 1
        base = next(
            c for c in cells if (c["prompt"], c["seed"], c["lora_scale"]) == (cell["prompt"], cell["seed"], 0.0)
        )
        a, b = videos[cell["key"]].astype(np.float64), videos[base["key"]].astype(np.float64)
        mse = np.mean((a - b) ** 2)
        expected_psnr = None if mse == 0 else 10 * np.log10(255**2 / mse)
        assert (numbers["psnr_vs_base"] is None) == (expected_psnr is None)
        if expected_psnr is not None:
            assert numbers["psnr_vs_base"] == pytest.approx(expected_psnr)
        frames = videos[cell["key"]]
        assert numbers["temporal_ssim"] == pytest.approx(
            np.mean([ssim(f, g) for f, g in zip(frames[:-1], frames[1:], strict=True)])
        )
        assert numbers["render_s"] > 0
        if cell["lora_scale"] == 0:
            assert numbers["ssim_vs_base"] == pytest.approx(1.0)
    assert sum(report["switches"].values()) <= 6  # grouped: one switch per (adapter set, scale)

    # The suggested scale follows the rule stated on the page, from the means in report.json.
    assert report["clip"] and "CLIPScore is at most 1 below" in report["rule"]
    for summary in report["sets"]:
        scales = [x for x in summary["scales"] if x > 0]
        means = {x: {k: v["mean"] for k, v in summary["summary"][str(x)].items()} for x in summary["scales"]}
        fits = [
            x
            for x in scales
            if means[x]["clip_score"] >= means[0.0]["clip_score"] - 1.0
            and means[x]["clip_consistency"] >= means[0.0]["clip_consistency"] - 0.02
        ]
        assert summary["suggested"] == (max(fits) if fits else None)
        shown = "none above 0" if summary["suggested"] is None else f"{summary['suggested']:g}"
        assert f"data-set='{summary['set']}'>{shown}</b>" in html

    again = lorafleet("sweep", sweep_spec, "--batch", "night2", "--compare", "night1", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "sweep night2: 12 cells, 0 enqueued, 12 already in the store" in again.stdout
    assert "evaluations: all 10 videos already evaluated by this evaluator" in again.stdout  # none redone
    assert "(0 cells moved since night1)" in again.stdout
    _, second = report_cells(store, "night2")
    assert [s["baseline_suggested"] for s in second["sets"]] == [s["suggested"] for s in report["sets"]]
    assert len({json.dumps(s["combination"]) for s in second["sets"]}) == 2  # each set known by its adapters


def test_cells_rendered_before_clip_was_configured_are_evaluated_by_the_next_sweep(
    fleet_env, start_worker, sweep_spec, tiny
):
    plain = start_worker(fleet_env)  # no LORAFLEET_EVAL_CLIP anywhere
    first = lorafleet("sweep", sweep_spec, "--batch", "before", env=fleet_env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "CLIP: none configured (LORAFLEET_EVAL_CLIP)" in first.stdout
    store = fleet_env["LORAFLEET_STORE_URL"]
    html, report = report_cells(store, "before")
    assert not report["clip"] and "no CLIP model is configured" in html
    assert all("clip_score" not in c["numbers"] and "temporal_ssim" in c["numbers"] for c in report["cells"])
    for summary in report["sets"]:  # without CLIP, temporal SSIM alone decides the suggested scale
        means = {x: summary["summary"][str(x)]["temporal_ssim"]["mean"] for x in summary["scales"]}
        fits = [x for x in summary["scales"] if x > 0 and means[x] >= means[0.0] - 0.02]
        assert summary["suggested"] == (max(fits) if fits else None)

    plain.terminate()
    plain.wait(timeout=60)
    env = {**fleet_env, "LORAFLEET_EVAL_CLIP": tiny["clip"]}
    start_worker(env)
    after = lorafleet("sweep", sweep_spec, "--batch", "after", env=env)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "0 enqueued, 12 already in the store" in after.stdout  # nothing rendered again
    assert "evaluating 10 video(s) on the fleet (0 already evaluated)" in after.stdout
    _, report = report_cells(store, "after")
    assert report["clip"]
    for cell in report["cells"]:  # the numbers CLIP gives these very videos, computed here
        video = decode_video(os.path.join(store, "videos", f"{cell['key']}.mp4"))
        assert cell["numbers"]["clip_score"] == pytest.approx(
            clip_score_of(video, cell["prompt_text"], tiny["clip"]), abs=1e-3
        )


def test_an_estimate_counts_what_is_left_and_prices_it_at_the_fleets_pace(fleet_env, start_worker, sweep_spec, tmp_path, tiny):
    from rich.console import Console

    from common.leases import Ledger
    from common.settings import Settings
    from producer.sweep import estimate_sweep

    start_worker(fleet_env)
    before = lorafleet("sweep", sweep_spec, "--estimate", env=fleet_env)
    assert before.returncode == 0, before.stdout + before.stderr
    assert "sweep nightly: 12 cells, 10 renders (cells that share a key share one), 0 already in the store" in before.stdout
    assert "none of its 1 workers has finished a job: no pace to estimate from" in before.stdout
    # One of the sweep's cells rendered: the base at lora_scale 0 (any adapter set's), and the worker's pace.
    base = {"prompt": "a cat walks along the beach", "seed": 1, "lora_scale": 0, "steps": 20, "height": 32, "width": 32}
    (tmp_path / "base.jsonl").write_text(json.dumps(base) + "\n")
    assert lorafleet("submit", str(tmp_path / "base.jsonl"), "--wait", env=fleet_env).returncode == 0
    after = lorafleet("sweep", sweep_spec, "--estimate", env=fleet_env)
    assert "10 renders (cells that share a key share one), 1 already in the store, 9 to render" in after.stdout
    priced = re.search(r"queue render: 9 renders, about (\d+) s of GPU time: (\d+) s on its 1 live worker", after.stdout)
    assert priced and int(priced[1]) == int(priced[2]) > 0, after.stdout
    # Priced by hand from the worker's pace: each of the 9 renders has the base job's steps and
    # pixels (20 steps of 9 × 32 × 32), so each costs 20 steps at its seconds a step plus the rest.
    settings = Settings(redis_url=fleet_env["LORAFLEET_REDIS_URL"], store_url=fleet_env["LORAFLEET_STORE_URL"], model=tiny["model"])
    (pace,) = [worker.pace for worker in Ledger.from_settings(settings).live_workers()]
    assert pace.pixels == 9 * 32 * 32 and pace.step_s > 0
    figures = estimate_sweep(sweep_spec, settings, Console(file=io.StringIO()))
    assert figures["queues"]["render"]["gpu_s"] == pytest.approx(9 * (20 * pace.step_s + pace.other_s))
    assert int(priced[1]) == round(figures["queues"]["render"]["gpu_s"])
    assert after.stdout.rstrip().endswith("nothing enqueued (--estimate)")
    batches = os.listdir(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches"))
    assert len(batches) == 1  # the one submitted: no estimate made a batch


def test_a_draft_night_is_confirmed_by_exact_renders_of_its_pick(fleet_env, start_worker, tiny, tmp_path):
    """The sweep renders in a draft tier (the tiny model with TaylorSeer), then the suggested scale,
    its neighbours and scale 0 again in the exact model; the report shows both, side by side."""
    draft = {"ref": tiny["model"], "cache": {"hook": "taylorseer"}}  # as the example spec's comment says
    env = {**fleet_env, "LORAFLEET_MODELS": json.dumps({"draft": draft})}
    start_worker(env, "draft", flags=("--model", "draft"))
    start_worker(env, "exact")
    spec = example("sweep_draft.yaml")
    done = lorafleet("sweep", spec, "--batch", "draft-night", env=env, cwd=demo_folder(tmp_path, tiny))
    assert done.returncode == 0, done.stdout + done.stderr
    html, report = report_cells(fleet_env["LORAFLEET_STORE_URL"], "draft-night")
    (summary,) = report["sets"]
    (confirmed,) = report["confirmed"]
    expected = confirm_scales(summary)  # the rule's table test: tests/unit/test_report_rules.py
    assert confirmed["scales"] == expected and f"set 0: lora_scale {', '.join(f'{x:g}' for x in expected)}" in done.stdout
    drafts = {c["lora_scale"]: c for c in report["cells"] if c.get("tier") is None}
    exacts = {c["lora_scale"]: c for c in report["cells"] if c.get("tier") == "exact"}
    assert len(drafts) == 5 and sorted(exacts) == expected
    for scale, cell in exacts.items():  # the same cell, another key: a draft never stands in for exact
        assert cell["key"] != drafts[scale]["key"]
        exact_meta = json.load(open(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "videos", f"{cell['key']}.json")))
        draft_meta = json.load(open(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "videos", f"{drafts[scale]['key']}.json")))
        assert exact_meta["cache"] is None and draft_meta["cache"]["hook"] == "taylorseer"
    assert "id='confirmed0'>Confirmed exactly (the fleet&#39;s default model)" in html and "class='confirmed-scale'" in html
    assert html.count("<video class='cell'") == 5 + 2 * len(expected)  # the draft grid, then draft beside exact
    assert html.index("class='notice draft'>A draft night: the grids below hold renders by the draft model") < html.index(
        "<h2>Suggested lora_scale</h2>"
    )  # said before anything is read as exact
    assert "<td>∞ → ∞</td>" in html  # scale 0's PSNR against its own base, as every other table says it
    assert "(n = 1: one prompt × seed, so no spread to show)" in html and " ± 0.000" not in html
    # Only the draft's pick and its neighbours are confirmed (on the tiny model 0 and 0.25): the exact
    # pick may be the largest scale confirmed, but below the draft's largest it is no edge of the
    # sweep, and no notice says to extend lora_scales there.
    assert confirmed["suggested"] is not None and confirmed["suggested"] < max(summary["scales"])
    assert [n["kind"] for n in confirmed["notices"] if n["kind"] == "edge-high"] == []


def test_a_refining_sweep_adds_only_the_scales_its_rule_calls_for_and_reuses_the_store(
    fleet_env, start_worker, tiny, tmp_path, monkeypatch
):
    """Real renders on the tiny model, with a planted metric curve: each cell's evaluation is in the
    store before the sweep asks for it (as a night after an earlier one finds it), CLIPScore falling
    as 10·scale² below scale 0's, so the rule's 1.0 tolerance lies at 0.316."""
    from common.evaluation import eval_path, evaluator_identity
    from common.model import model_info
    from common.settings import Settings
    from common.store import Store
    from common.sweep_grid import load_sweep
    from tests.helpers import default_limits, resolver_for

    worker = start_worker(fleet_env)
    cwd = demo_folder(tmp_path, tiny)
    spec = yaml.safe_load(open(example("sweep_refine.yaml")))
    path = tmp_path / "every-scale.json"  # the same spec at every scale its rounds may visit: their keys
    path.write_text(json.dumps({**spec, "lora_scales": [0, 0.25, 0.5, 0.75, 1]}))
    store = Store(fleet_env["LORAFLEET_STORE_URL"])
    monkeypatch.chdir(cwd)
    every = load_sweep(str(path), lambda alias: model_info(tiny["model"]), resolver_for(store), default_limits())
    identity = evaluator_identity(Settings(_env_file=None))
    for job, cell in zip(every[1], every[2], strict=True):
        numbers = {"clip_score": 30 + cell.prompt - 10 * cell.lora_scale**2, "clip_consistency": 0.95}
        planted = {"key": job.key, "evaluator": identity, "numbers": {**numbers, "temporal_ssim": 0.5}}
        store.write_bytes(eval_path(job.key), json.dumps(planted).encode())
    path = example("sweep_refine.yaml")
    first = lorafleet("sweep", path, "--batch", "refine1", env=fleet_env, cwd=cwd)
    assert first.returncode == 0, first.stdout + first.stderr
    # 1 fails (a drop of 10): halfway to 0, 0.5 (2.5) fails too, then 0.25 (0.625) passes; the gap
    # to 0.5 is within the resolution: done after two of its three rounds, suggesting 0.25.
    rounds = re.findall(r"refining, round (\d): set 0: lora_scale ([\d.]+)", first.stdout)
    assert rounds == [("1", "0.5"), ("2", "0.25")], first.stdout
    html, report = report_cells(fleet_env["LORAFLEET_STORE_URL"], "refine1")
    (summary,) = report["sets"]
    assert summary["scales"] == [0.0, 0.25, 0.5, 1.0] and summary["suggested"] == 0.25
    refined = {c["lora_scale"]: c["refined"] for c in report["cells"] if c.get("refined")}
    assert refined == {0.5: 1, 0.25: 2} and "refined, round 2" in html
    assert refine_scale(summary, 0.3) is None
    # A second night: the same rounds, every cell found in the store, nothing rendered again.
    rendered = render_records([worker.log_path])
    second = lorafleet("sweep", path, "--batch", "refine2", env=fleet_env, cwd=cwd)
    assert second.returncode == 0 and "6 cells, 0 enqueued, 6 already in the store" in second.stdout
    assert re.findall(r"refining, round (\d): set 0: lora_scale ([\d.]+)", second.stdout) == rounds
    assert render_records([worker.log_path]) == rendered


def test_a_two_axis_sweep_refines_each_combination_at_its_own_suggestion(
    fleet_env, start_worker, tiny, tmp_path, monkeypatch
):
    """guidance_scale 4 and 8 against lora_scale, refined: planted CLIPScore curves fall as 10·scale²
    at guidance 4 and 40·scale² at 8, so the rule's tolerance of 1.0 lies at 0.316 and at 0.158."""
    from common.evaluation import eval_path, evaluator_identity
    from common.model import model_info
    from common.settings import Settings
    from common.store import Store
    from common.sweep_grid import load_sweep
    from tests.helpers import default_limits, resolver_for

    start_worker(fleet_env)
    cwd = demo_folder(tmp_path, tiny)
    spec = {
        **yaml.safe_load(open(example("sweep_refine.yaml"))), "name": "axes-refined",
        "axes": {"guidance_scale": [4, 8]},
    }  # fmt: skip
    every = tmp_path / "every-scale.json"
    every.write_text(json.dumps({**spec, "lora_scales": [0, 0.25, 0.5, 0.75, 1]}))
    store = Store(fleet_env["LORAFLEET_STORE_URL"])
    monkeypatch.chdir(cwd)
    _, jobs, cells, _ = load_sweep(str(every), lambda a: model_info(tiny["model"]), resolver_for(store), default_limits())
    identity = evaluator_identity(Settings(_env_file=None))
    for job, cell in zip(jobs, cells, strict=True):
        fall = {4: 10, 8: 40}[cell.axes["guidance_scale"]] * cell.lora_scale**2
        numbers = {"clip_score": 30 + cell.prompt - fall, "clip_consistency": 0.95, "temporal_ssim": 0.5}
        store.write_bytes(eval_path(job.key), json.dumps({"key": job.key, "evaluator": identity, "numbers": numbers}).encode())
    path = tmp_path / "axes-refined.json"
    path.write_text(json.dumps(spec))
    done = lorafleet("sweep", str(path), "--batch", "axes-refined", env=fleet_env, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    # guidance 4: 1 fails, 0.5 fails, 0.25 passes; guidance 8: 1, 0.5 and 0.25 fail, and the gap
    # from 0 to 0.25 is within the resolution: both refined twice, each at its own scales.
    said = re.findall(r"refining, round \d: .*", done.stdout)
    assert said == [
        "refining, round 1: set 0 at guidance_scale 4: lora_scale 0.5; set 0 at guidance_scale 8: lora_scale 0.5",
        "refining, round 2: set 0 at guidance_scale 4: lora_scale 0.25; set 0 at guidance_scale 8: lora_scale 0.25",
    ], done.stdout
    html, report = report_cells(fleet_env["LORAFLEET_STORE_URL"], "axes-refined")
    assert [(s["axes"], s["scales"], s["suggested"]) for s in report["sets"]] == [
        ({"guidance_scale": 4}, [0.0, 0.25, 0.5, 1.0], 0.25), ({"guidance_scale": 8}, [0.0, 0.25, 0.5, 1.0], None),
    ]  # fmt: skip
    grid = html[html.index("<h2 id='grid'>") : html.index("<h2 id='set0-a0'>")]
    assert grid.count("<i class='refined'>refined</i>") == 4  # 0.25 and 0.5 in each row
    assert html.count("refined, round 2") == 2  # each section's own grid marks its round


def test_a_two_axis_draft_night_confirms_each_combinations_pick(fleet_env, start_worker, tiny, tmp_path):
    draft = {"ref": tiny["model"], "cache": {"hook": "taylorseer"}}
    env = {**fleet_env, "LORAFLEET_MODELS": json.dumps({"draft": draft})}
    start_worker(env, "draft", flags=("--model", "draft"))
    start_worker(env, "exact")
    spec = {
        **yaml.safe_load(open(example("sweep_draft.yaml"))), "name": "axes-draft", "lora_scales": [0.5, 1],
        "axes": {"guidance_scale": [4, 8]},
    }  # fmt: skip
    path = tmp_path / "axes-draft.json"
    path.write_text(json.dumps(spec))
    done = lorafleet("sweep", str(path), "--batch", "axes-draft", env=env, cwd=demo_folder(tmp_path, tiny))
    assert done.returncode == 0, done.stdout + done.stderr
    html, report = report_cells(fleet_env["LORAFLEET_STORE_URL"], "axes-draft")
    sections = {s["section"]: s for s in report["sets"]}
    confirmed = {c["section"]: c for c in report["confirmed"]}
    assert sorted(confirmed) == sorted(sections) == ["set0-a0", "set0-a1"]
    for name, exact in confirmed.items():  # each combination's pick, its neighbours and 0, at its own axes
        assert exact["axes"] == sections[name]["axes"] and exact["scales"] == confirm_scales(sections[name])
        cells = [c for c in report["cells"] if c.get("tier") == "exact" and c["axes"] == exact["axes"]]
        assert sorted({c["lora_scale"] for c in cells}) == exact["scales"]
        assert f"id='confirmed{name.removeprefix('set')}'>Confirmed exactly" in html
    assert "set 0 at guidance_scale 4: lora_scale" in done.stdout and "set 0 at guidance_scale 8: lora_scale" in done.stdout
    grid = html[html.index("<h2 id='grid'>") : html.index("<h2 id='set0-a0'>")]
    marked = sum(len(c["scales"]) for c in confirmed.values())
    assert grid.count("<i class='confirmed'>confirmed exactly</i>") == marked and grid.count("; exactly: <b>") == 2


def test_a_two_axis_sweep_renders_each_cell_once_and_lays_out_the_grid(fleet_env, start_worker, tiny, tmp_path):
    start_worker(fleet_env)
    spec, cwd = example("sweep_axes.yaml"), demo_folder(tmp_path, tiny)
    done = lorafleet("sweep", spec, "--batch", "guidance", env=fleet_env, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sweep guidance: 12 cells, 12 enqueued" in done.stdout  # 2 guidance × 2 scales × 3 prompts, each once
    html, report = report_cells(fleet_env["LORAFLEET_STORE_URL"], "guidance")
    store = fleet_env["LORAFLEET_STORE_URL"]
    for cell in report["cells"]:  # each cell rendered at its own place on the new axis
        metadata = json.load(open(os.path.join(store, "videos", f"{cell['key']}.json")))
        assert metadata["job"]["guidance_scale"] == cell["axes"]["guidance_scale"]
    assert [(s["set"], s["axes"], s["section"]) for s in report["sets"]] == [
        (0, {"guidance_scale": 4}, "set0-a0"), (0, {"guidance_scale": 8}, "set0-a1")
    ]  # fmt: skip
    # On the tiny model scale 1 flickers more than the rule allows, and 0 and 1 are told apart over
    # 3 prompts: each combination is refined at its own scales (its 3 prompts once a round) and says
    # why it stopped.
    refined = [s["refinement"]["rounds"] for s in report["sets"]]
    assert all(refined) and len({c["key"] for c in report["cells"]}) == 12 + 3 * sum(map(len, refined))
    for s in report["sets"]:
        assert f"<div class='refinement' data-set='0'>Refined in {len(s['refinement']['rounds'])} round(s)" in html
        assert f"{s['refinement']['said']}.</div>" in html and s["refinement"]["said"].startswith("stopped: ")
    assert f"<p>{len(report['cells'])} cells in 1 adapter set(s), each at 2 combinations of guidance_scale;" in html
    seen = probe_page(os.path.join(store, "batches", "guidance", "report.html"), REPORT_PROBE, str(tmp_path / "profile"))
    assert seen["suggested"] == [suggested_text(s) for s in report["sets"]]
    said = [
        f"Refined in {len(r['rounds'])} round(s) (lora_scale {', then '.join(map(str, r['rounds']))}); {r['said']}."
        for r in (s["refinement"] for s in report["sets"])
    ]
    assert seen["refinement"] == said * 2  # at the top, then in each combination's section
    rounds = [len(s["refinement"]["rounds"]) for s in report["sets"]]
    assert len(seen["refined"]) == 2 * sum(rounds)  # each refined cell of the grid, and its section's column
    assert "<dt>guidance scale</dt><dd>4.0, 8.0 (swept: see each section)</dd>" in html
    grid = html[html.index("<h2 id='grid'>") :]
    assert grid.startswith("<h2 id='grid'>guidance_scale × lora_scale: mean temporal SSIM</h2>")
    assert "<a href='#set0-a0'>guidance_scale 4</a>" in grid and "<a href='#set0-a1'>guidance_scale 8</a>" in grid
    for section in ("set0-a0", "set0-a1"):
        assert f"<h2 id='{section}'>" in html
        assert os.path.getsize(os.path.join(store, "batches", "guidance", "plots", f"{section}.png")) > 0


def test_a_bad_sweep_spec_names_the_place(fleet_env, tmp_path, tiny):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        f"prompts: [a cat]\nadapter_sets:\n  - [{tiny['style']}]\n  - [{{uri: {tiny['style']}, wieght: 0.8}}]\n"
        "  - [missing/adapter]\nlora_scales: [0, 1]\nseeds: [1]\n"
        "suggest: {clip_drop: 1}\nmoved: {clip_score: -1}\nconfirm: {model: nowhere}\n"
        "axes: {guidance: [4], steps: [0]}\n"
    )
    result = lorafleet("sweep", str(spec), env=fleet_env)
    assert 'confirm.model: unknown model alias "nowhere"' in result.stderr
    assert 'axes: unknown field "guidance" (did you mean "guidance_scale"?)' in result.stderr
    assert "axes.steps[0]: must be between 1 and 1000" in result.stderr
    assert result.returncode == 2
    assert 'adapter_sets[1][0]: unknown field "wieght" (did you mean "weight"?)' in result.stderr
    assert 'adapter_sets[2][0].uri: adapter "missing/adapter" not found' in result.stderr
    assert 'suggest: unknown field "clip_drop" (did you mean "clip_score_drop"?)' in result.stderr
    assert "moved.clip_score: must be a finite number ≥ 0, got -1" in result.stderr


def test_the_report_plays_every_cell_in_a_real_browser(fleet_env, start_worker, sweep_spec, tiny, tmp_path):
    browser = chromium()
    env = {**fleet_env, "LORAFLEET_EVAL_CLIP": tiny["clip"]}
    start_worker(env)
    assert lorafleet("sweep", sweep_spec, "--batch", "browse", env=env).returncode == 0
    folder = os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "browse")
    # A copy of the report with a probe: once every video has its first frame (or failed), play
    # them all, and write into the page what the browser saw.
    probe = """<script>
      const visible = e => e.offsetParent !== null && e.getBoundingClientRect().height > 0;
      window.addEventListener('load', async () => {
        const videos = [...document.querySelectorAll('video')];
        await Promise.all(videos.map(v => v.readyState >= 2 ? null : new Promise(done => {
          v.addEventListener('loadeddata', done); v.addEventListener('error', done); })));
        const ready = videos.filter(v => v.readyState >= 2).length;
        const played = await Promise.all(videos.map(v => v.play().then(() => !v.paused, () => false)));
        const start = videos.map(v => v.currentTime);
        // every video's clock moves within a few seconds; on a loaded machine some take longer than 1.5 s
        const moved = () => videos.filter((v, i) => v.currentTime !== start[i]).length;
        for (let waited = 0; waited < 10000 && moved() < videos.length; waited += 100) {
          await new Promise(done => setTimeout(done, 100));
        }
        document.body.setAttribute('data-probe', JSON.stringify({
          videos: videos.length, ready, playing: played.filter(Boolean).length,
          advanced: moved(),
          errors: videos.filter(v => v.error).map(v => v.error.message),
          suggested: [...document.querySelectorAll('.suggested-scale')].filter(visible).map(e => e.textContent),
          metrics: [...document.querySelectorAll('#metrics li.metric')].filter(visible).map(e => e.dataset.metric),
          rule: visible(document.getElementById('rule')),
          notices: [...document.querySelectorAll('.notice')].filter(visible).map(e => e.dataset.kind),
          spread: [...document.querySelectorAll('h3.spread')].filter(visible).map(e => e.textContent),
          plots: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
        }));
      });
    </script>"""
    found = probe_page(os.path.join(folder, "report.html"), probe, str(tmp_path / "profile"))
    assert found["videos"] == 12 + 8  # the two grids, then the sets side by side at scales 0.5 and 1
    assert found["errors"] == [] and found["ready"] == found["videos"], found
    assert found["playing"] == found["videos"] and found["advanced"] == found["videos"], found
    report = json.load(open(os.path.join(folder, "report.json")))
    assert found["suggested"] == [
        "none above 0" if s["suggested"] is None else f"{s['suggested']:g}" for s in report["sets"]
    ]
    assert found["metrics"] == ["clip_score", "clip_consistency", "temporal_ssim", "ssim_vs_base", "psnr_vs_base"]
    assert found["rule"] and found["plots"] == 2
    # 2 prompts × 1 seed: no suggestion can be told from its neighbour, or it sits at an edge; each
    # set's notices show beside its suggestion at the top and again in its own section.
    kinds = [n["kind"] for s in report["sets"] for n in s["notices"]]
    assert all(s["notices"] for s in report["sets"]) and found["notices"] == kinds + kinds
    assert found["spread"] == ["Mean ± standard deviation over the prompt × seed pairs at each scale (n = 2)"] * 2

    screenshot = tmp_path / "report.png"  # the test's output folder: look at it
    subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2400",
         "--virtual-time-budget=5000", f"--screenshot={screenshot}",
         f"file://{os.path.join(folder, 'report.html')}"],
        capture_output=True, timeout=180,
    )  # fmt: skip
    assert screenshot.stat().st_size > 10_000


def test_an_image_to_video_sweep_shows_each_input_image_beside_its_rows(fleet_env, start_worker, tiny_kinds, tmp_path):
    i2v = tiny_kinds["i2v"]
    env = {**fleet_env, "LORAFLEET_MODELS": json.dumps({"i2v": i2v["model"]})}
    start_worker(env, flags=("--model", "i2v"))
    spec = {
        "model": "i2v",
        "prompts": [{"prompt": "a cat", "image": i2v["sunset"]}, {"prompt": "a cat", "image": i2v["tiles"]}],
        "adapter_sets": [[i2v["style"]]],
        "lora_scales": [0, 1],
        "render": {"steps": 4},
    }
    path = tmp_path / "i2v-sweep.json"
    path.write_text(json.dumps(spec))
    sweep = lorafleet("sweep", str(path), "--batch", "i2v-night", env=env)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    html, report = report_cells(fleet_env["LORAFLEET_STORE_URL"], "i2v-night")
    assert len({c["key"] for c in report["cells"]}) == 4  # the same prompt, two images: two rows
    folder = os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "i2v-night")
    for name in ("sunset", "tiles"):
        (sha256,) = {c["image"]["sha256"] for c in report["cells"] if c["image"]["uri"] == i2v[name]}
        assert html.count(f"<img src='images/{sha256}.png' class='input'") == 1  # one row, one thumbnail
        thumbnail = Image.open(os.path.join(folder, "images", f"{sha256}.png"))
        assert np.array_equal(np.asarray(thumbnail.convert("RGB")), np.asarray(Image.open(i2v[name]).convert("RGB")))

    text_to_video = dict(spec, model=None, prompts=[{"prompt": "a cat", "image": i2v["sunset"]}])
    path.write_text(json.dumps(text_to_video))
    refused = lorafleet("sweep", str(path), "--batch", "refused", env=env)
    assert refused.returncode == 2
    assert "prompts[0].image: this model is text-to-video and takes no image" in refused.stdout + refused.stderr
