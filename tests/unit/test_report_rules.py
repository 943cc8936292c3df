"""The sweep report's rules, as tables: which scale is suggested, and which cells moved since a
baseline night (producer/report/rules.py). Plain data in, no videos, no torch."""

import json

import pytest

from common.sweep_spec import MOVED, SUGGEST
from producer.report import (
    MIN_PAIRS,
    ReportCell,
    confirm_scales,
    distinguishable,
    mark_moved,
    refine_scale,
    refinement,
    summarise,
)

pytestmark = pytest.mark.unit
ADAPTERS = [{"sha256": "ab" * 32, "weight": 1.0, "alpha": None, "uri": "style"}]


def cells(numbers_by_scale: dict[float, list[dict]]) -> list[ReportCell]:
    """One cell per (scale, prompt): `numbers_by_scale[scale][prompt]` are that cell's numbers."""
    return [
        ReportCell(
            set=0, prompt=p, seed=1, lora_scale=scale, adapters=ADAPTERS, numbers=numbers, key=f"{p}-{scale}",
            prompt_text="a cat", status="done", worker="w1", evaluated=True,
        )  # fmt: skip
        for scale, per_prompt in numbers_by_scale.items()
        for p, numbers in enumerate(per_prompt)
    ]


def clip(score: float, consistency: float) -> dict:
    return {"clip_score": score, "clip_consistency": consistency, "temporal_ssim": 0.9}


@pytest.mark.parametrize(
    "scales, suggested",
    [
        # every scale within both tolerances: the largest
        ({0.0: [clip(30, 0.95)], 0.5: [clip(29.5, 0.94)], 1.0: [clip(29.2, 0.94)]}, 1.0),
        # the CLIPScore drops past 1.0 at scale 1: the one below
        ({0.0: [clip(30, 0.95)], 0.5: [clip(29.5, 0.94)], 1.0: [clip(28.5, 0.94)]}, 0.5),
        # consistency drops past 0.02 at 0.5 already, recovers at 1.0: the largest that holds both
        ({0.0: [clip(30, 0.95)], 0.5: [clip(30, 0.90)], 1.0: [clip(30, 0.94)]}, 1.0),
        # nothing above 0 holds: no suggestion
        ({0.0: [clip(30, 0.95)], 0.5: [clip(20, 0.95)], 1.0: [clip(20, 0.5)]}, None),
        # the mean over prompts decides: one prompt's drop is averaged with the other's gain
        ({0.0: [clip(30, 0.95), clip(30, 0.95)], 1.0: [clip(28.5, 0.95), clip(31, 0.95)]}, 1.0),
    ],
    ids=["all-hold", "clip-drops", "consistency-dips", "none-holds", "mean-over-prompts"],
)
def test_the_suggested_scale_is_the_largest_within_both_tolerances(scales, suggested):
    assert summarise(0, cells(scales), SUGGEST, clip=True)["suggested"] == suggested


@pytest.mark.parametrize(
    "a, b, told_apart",
    [
        ([3.6, 3.6], [3.4, 3.4], False),  # two pairs: too few to tell, however steady
        ([30, 31, 29, 30], [28, 29, 27, 28], True),  # every pair 2 lower: steady
        ([30, 31, 29, 30], [31, 29, 30, 28.5], False),  # as often up as down
        ([30, 30, 30], [30, 30, 30], False),  # identical
        ([30.0] * 12, [29.9, 30.1] * 6, False),  # noise around the same mean
        ([30.0] * 12, [29.6, 29.8] * 6, True),  # small, but on every pair
    ],
    ids=["two-pairs", "steady-drop", "up-and-down", "identical", "noise", "small-steady"],
)
def test_two_scales_are_told_apart_by_a_paired_comparison(a, b, told_apart):
    assert distinguishable(a, b) is told_apart


def notices(scales: dict, clip_on: bool = True) -> dict[str, str]:
    return {n["kind"]: n["text"] for n in summarise(0, cells(scales), SUGGEST, clip=clip_on)["notices"]}


def steady(score: float, consistency: float, prompts: int = 4) -> list[dict]:
    """`prompts` cells with the same numbers but for a small per-prompt offset every scale shares."""
    return [clip(score + p * 0.5, consistency) for p in range(prompts)]


@pytest.mark.parametrize(
    "scales, kinds",
    [
        # the rule passes 0.5 and turns 1.0 down, on every prompt: nothing to say
        ({0.0: steady(30, 0.95), 0.5: steady(29.5, 0.95), 1.0: steady(27, 0.95)}, set()),
        # the largest scale swept passes: extend upward
        ({0.0: steady(30, 0.95), 0.5: steady(29.8, 0.95), 1.0: steady(29.5, 0.95)}, {"edge-high"}),
        # nothing above 0 passes, clearly: extend downward
        ({0.0: steady(30, 0.95), 0.5: steady(27, 0.95), 1.0: steady(25, 0.95)}, {"edge-low"}),
        # the case: 2 prompts × 1 seed, the star over its neighbour with no way to tell them apart
        ({0.0: [clip(3.6, 0.9), clip(3.6, 0.9)], 0.5: [clip(3.6, 0.9), clip(3.6, 0.9)],
          1.0: [clip(0, 0.9), clip(7.2, 0.85)]}, {"indistinguishable"}),
        # four prompts, but the turned-down scale's drop comes from one prompt
        ({0.0: steady(30, 0.95), 0.5: steady(30, 0.95), 1.0: [clip(22, 0.95), *steady(31, 0.95, 3)]},
         {"indistinguishable"}),
    ],
    ids=["interior", "top-edge", "bottom-edge", "two-prompts", "one-prompt-drops"],
)  # fmt: skip
def test_the_report_says_when_a_suggestion_is_at_an_edge_or_not_told_apart(scales, kinds):
    found = notices(scales)
    assert set(found) == kinds
    if "edge-high" in found:
        assert "extend lora_scales above 1" in found["edge-high"]
    if "edge-low" in found:
        assert "between 0 and 0.5" in found["edge-low"]
    if "indistinguishable" in found:
        assert f"at least {MIN_PAIRS} prompt × seed pairs" in found["indistinguishable"]


@pytest.mark.parametrize(
    "suggested, confirmed",
    [(0.5, [0.0, 0.25, 0.5, 0.75]), (1.0, [0.0, 0.75, 1.0]), (0.25, [0.0, 0.25, 0.5]), (None, [0.0, 0.25])],
    ids=["interior", "top", "bottom", "none"],
)
def test_a_draft_is_confirmed_at_its_pick_its_neighbours_and_scale_0(suggested, confirmed):
    assert confirm_scales({"scales": [0.0, 0.25, 0.5, 0.75, 1.0], "suggested": suggested}) == confirmed


@pytest.mark.parametrize(
    "scales, added, said",
    [
        # 0.5 passes, 1.0 is turned down on every prompt: halfway between them
        ({0.0: steady(30, 0.95), 0.5: steady(29.5, 0.95), 1.0: steady(27, 0.95)}, 0.75, "the next round adds 0.75"),
        # nothing above 0 passes: halfway between 0 and the smallest scale
        ({0.0: steady(30, 0.95), 0.5: steady(27, 0.95), 1.0: steady(25, 0.95)}, 0.25, "the next round adds 0.25"),
        # the gap is down to the resolution: done
        (
            {0.0: steady(30, 0.95), 0.5: steady(29.5, 0.95), 0.55: steady(27, 0.95)}, None,
            "stopped: 0.5 (passed) and 0.55 (turned down) are 0.05 apart, within the resolution 0.05",
        ),
        # the top scale passes: nothing above it to refine towards (the edge notice says extend)
        (
            {0.0: steady(30, 0.95), 0.5: steady(29.8, 0.95), 1.0: steady(29.5, 0.95)}, None,
            "stopped: 1 passed and is the largest scale swept: there is no scale above it to refine toward",
        ),
        # the rule cannot tell 0.5 from 1.0 (one prompt's drop): refining would chase noise
        (
            {0.0: steady(30, 0.95), 0.5: steady(30, 0.95), 1.0: [clip(22, 0.95), *steady(31, 0.95, 3)]}, None,
            "stopped: 0.5 (passed) and 1 (turned down) cannot be told apart at this sample size (see the notice)",
        ),
    ],
    ids=["between", "below-smallest", "resolved", "top-edge", "indistinguishable"],
)  # fmt: skip
def test_refinement_halves_the_gap_the_rule_decided_in_and_says_why_it_stops(scales, added, said):
    summary = summarise(0, cells(scales), SUGGEST, clip=True)
    assert refine_scale(summary, 0.05) == added
    assert refinement(summary, cells(scales), {"resolution": 0.05, "rounds": 3}) == {"rounds": [], "said": said}


def test_with_no_scale_passed_the_notice_names_scale_0_as_the_reference_not_as_passed():
    one_prompt = cells({0.0: [clip(30, 0.95)], 0.5: [clip(20, 0.95)]})
    summary = summarise(0, one_prompt, SUGGEST, clip=True)
    assert summary["suggested"] is None
    (indistinguishable,) = [n["text"] for n in summary["notices"] if n["kind"] == "indistinguishable"]
    assert indistinguishable.startswith("lora_scale 0 (the reference) and 0.5 (turned down) are not distinguishable")
    assert refinement(summary, one_prompt, {"resolution": 0.1, "rounds": 3})["said"] == (
        "stopped: 0 (the reference) and 0.5 (turned down) cannot be told apart at this sample size (see the notice)"
    )


def test_refinement_names_each_rounds_scale_and_stops_when_the_rounds_are_spent():
    swept = cells({0.0: steady(30, 0.95), 0.5: steady(29.5, 0.95), 0.75: steady(29.4, 0.95), 1.0: steady(27, 0.95)})
    swept = [c.model_copy(update={"refined": {0.5: 1, 0.75: 2}.get(c.lora_scale)}) for c in swept]
    summary = summarise(0, swept, SUGGEST, clip=True)
    assert refinement(summary, swept, {"resolution": 0.05, "rounds": 2}) == {
        "rounds": [0.5, 0.75],
        "said": "stopped: the 2 round(s) the spec allows are spent (the next would add 0.875)",
    }


def test_the_spread_is_the_sample_standard_deviation_over_prompts_and_seeds():
    summary = summarise(0, cells({0.0: [clip(30, 0.9), clip(32, 0.9)]}), SUGGEST, clip=True)["summary"]
    assert summary["0.0"]["clip_score"] == {"mean": 31.0, "sd": pytest.approx(2**0.5), "n": 2}


def test_without_clip_the_suggestion_rests_on_temporal_ssim():
    scales = {0.0: [{"temporal_ssim": 0.90}], 0.5: [{"temporal_ssim": 0.89}], 1.0: [{"temporal_ssim": 0.80}]}
    summary = summarise(0, cells(scales), SUGGEST, clip=False)
    assert summary["suggested"] == 0.5
    assert summary["summary"]["0.5"]["temporal_ssim"] == {"mean": 0.89, "sd": 0.0, "n": 1}


@pytest.mark.parametrize(
    "before, now, moved",
    [
        ({"clip_score": 30.0}, {"clip_score": 30.9}, []),  # within 1.0
        ({"clip_score": 30.0}, {"clip_score": 31.5}, ["clip_score"]),
        ({"ssim_vs_base": 0.90}, {"ssim_vs_base": 0.95}, ["ssim_vs_base"]),
        ({"psnr_vs_base": None}, {"psnr_vs_base": None}, []),  # identical both nights (∞ dB)
        ({"psnr_vs_base": None}, {"psnr_vs_base": 40.0}, ["psnr_vs_base"]),  # was identical, is not now
        ({}, {"clip_score": 30.0}, []),  # not measured on the baseline night (no CLIP then)
    ],
)
def test_a_cell_moved_when_a_number_changed_past_its_threshold(before, now, moved):
    tonight = cells({1.0: [now]})
    baseline = [tonight[0].model_copy(update={"numbers": before})]
    assert mark_moved(tonight, baseline, MOVED)[0].moved == moved


def test_a_baseline_report_lorafleet_did_not_write_is_named_and_not_compared(tmp_path):
    """--compare reads another night's report.json from the store: a cell that is not one lorafleet
    wrote is a warning and a report without comparison, not a traceback halfway through the night."""
    from rich.console import Console

    from common.store import Store
    from producer.report.cells import written
    from producer.sweep import baseline

    store = Store(str(tmp_path))
    good = written(cells({0.0: [clip(30, 0.9)]}))
    store.write_bytes("batches/night1/report.json", json.dumps({"batch": "night1", "cells": good}).encode())
    store.write_bytes("batches/night2/report.json", json.dumps({"cells": [{**good[0], "lora_scale": "x"}]}).encode())
    console = Console(record=True, width=200)
    assert written(baseline(store, "night1", "nightly", "night3", console).cells) == good
    assert baseline(store, "night2", "nightly", "night3", console) is None
    said = console.export_text()
    assert "batch night2's report.json is not a report lorafleet reads" in said and "without comparison" in said


@pytest.mark.parametrize(
    "written",
    [
        '{"key": "KEY", "evaluator": {"version": 1, "clip": null}, "numbers": {"temporal_ssim": NaN}}',
        '{"key": "KEY", "evaluator": {"version": 1, "clip": null}, "numbers": {"temporal_ssim": "high"}}',
        '{"key": "KEY", "evaluator": {"version": 1, "clip": null}}',
        '{"key": "OTHER", "evaluator": {"version": 1, "clip": null}, "numbers": {"temporal_ssim": 0.9}}',
        "not json",
    ],
)
def test_an_evaluation_lorafleet_did_not_write_for_this_key_is_computed_again(tmp_path, written):
    """A sweep reads eval.json files from the store, which anyone who can write there can write: one
    that is not a finite evaluation of this very key counts as missing (evaluated again), not a crash."""
    from common.evaluation import Evaluation, eval_path, read_evaluation, write_evaluation
    from common.store import Store

    store, key = Store(str(tmp_path)), "ab" * 32
    store.write_bytes(eval_path(key), written.replace("KEY", key).replace("OTHER", "cd" * 32).encode())
    assert read_evaluation(store, key) is None
    good = Evaluation(key=key, evaluator={"version": 1, "clip": None}, numbers={"temporal_ssim": 0.9})
    write_evaluation(store, good)
    assert read_evaluation(store, key) == good


def test_a_videos_metadata_that_is_not_a_workers_is_named_not_a_traceback(tmp_path):
    """The report reads each video's metadata from the store: a file that is not what a worker
    writes for that key stops the report with the file's name, not a KeyError halfway through."""
    from common.errors import StoreError
    from common.store import Store, video_path
    from producer.report import read_metadata

    store, key = Store(str(tmp_path)), "ab" * 32
    written = {"key": key, "worker": "w1", "model": "m", "timings_s": {"total": 2.5}, "rendered_at": "2026-12-08T00:00:00Z"}
    store.write_bytes(video_path(key, "json"), json.dumps(written).encode())
    assert read_metadata(store, key).timings_s.total == 2.5
    for bad in ({**written, "timings_s": {}}, {**written, "key": "cd" * 32}, {**written, "worker": None}):
        store.write_bytes(video_path(key, "json"), json.dumps(bad).encode())
        with pytest.raises(StoreError, match=f"{key}.json"):
            read_metadata(store, key)
