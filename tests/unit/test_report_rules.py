"""The sweep report's rules, as tables: which scale is suggested, and which cells moved since a
baseline night (producer/report.py). Plain data in, no videos, no torch."""

import pytest

from common.sweep_spec import MOVED, SUGGEST
from producer.report import _mark_moved, _summarise

pytestmark = pytest.mark.unit
ADAPTERS = [{"sha256": "ab" * 32, "weight": 1.0, "alpha": None, "uri": "style"}]


def cells(numbers_by_scale: dict[float, list[dict]]) -> list[dict]:
    """One cell per (scale, prompt): `numbers_by_scale[scale][prompt]` are that cell's numbers."""
    return [
        {"set": 0, "prompt": p, "seed": 1, "lora_scale": scale, "adapters": ADAPTERS, "numbers": numbers}
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
    assert _summarise(0, cells(scales), SUGGEST, clip=True)["suggested"] == suggested


def test_without_clip_the_suggestion_rests_on_temporal_ssim():
    scales = {0.0: [{"temporal_ssim": 0.90}], 0.5: [{"temporal_ssim": 0.89}], 1.0: [{"temporal_ssim": 0.80}]}
    summary = _summarise(0, cells(scales), SUGGEST, clip=False)
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
    for cell in tonight:
        cell.update(moved=[], prompt_text="a cat")
    baseline = {"cells": [{**tonight[0], "numbers": before}]}
    _mark_moved(tonight, baseline, MOVED)
    assert tonight[0]["moved"] == moved
