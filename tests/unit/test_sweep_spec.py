"""A sweep spec's shape and expansion (common/sweep_spec.py, common/sweep_grid.py), torch-free: an
old spec's keys stay what they were, further axes multiply the cells, and a bad axis or combination
is named."""

import hashlib
import json

import pytest

from common.errors import JobFileError
from common.model import ModelInfo
from common.sweep_grid import load_sweep
from tests.helpers import default_limits, resolver_for

pytestmark = pytest.mark.unit
MODEL = ModelInfo(
    ref="/models/tiny", scheduler="CogVideoXDPMScheduler", num_frames=9, height=16, width=16,
    frame_step=8, size_step=16, max_text_tokens=16,
)  # fmt: skip
OLD = {
    "name": "old", "prompts": ["a cat walks", "a dog runs"], "adapter_sets": [[]], "lora_scales": [0, 0.5, 1],
    "seeds": [1, 2], "render": {"steps": 20, "guidance_scale": 5.0},
}  # fmt: skip


def load(tmp_path, spec: dict):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return load_sweep(str(path), lambda alias: MODEL, resolver_for(), default_limits())


def test_an_old_spec_keeps_its_keys_and_cells(tmp_path):
    """Keys and cells computed by a581176, before sweeps had further axes."""
    _, jobs, cells, _ = load(tmp_path, OLD)
    keys = [job.key for job in jobs]
    assert keys[0] == "62f9c83742c60980477d252e30d993446291c35dde4b41b2ccd00ba33610f538"
    assert hashlib.sha256("".join(keys).encode()).hexdigest() == (
        "34ede02e70fde05b961c7f0db5ce8b135e0b6563b5ca4bb1440a88d387c1b88f"
    )
    # as report.json holds it: no "axes" where none were given
    assert cells[0].model_dump() == {"set": 0, "prompt": 0, "seed": 1, "lora_scale": 0.0}


def test_further_axes_multiply_the_cells_and_enter_each_job(tmp_path):
    spec = {**OLD, "render": {"steps": 20}, "axes": {"guidance_scale": [4, 8], "negative_prompt": ["", "blurry"]}}
    _, jobs, cells, _ = load(tmp_path, spec)
    assert len(jobs) == 12 * 4 and len({job.key for job in jobs}) == 12 * 4
    assert {(job.guidance_scale, job.negative_prompt) for job in jobs} == {(4, ""), (4, "blurry"), (8, ""), (8, "blurry")}
    assert all(c.axes == {"guidance_scale": j.guidance_scale, "negative_prompt": j.negative_prompt}
               for j, c in zip(jobs, cells, strict=True))  # fmt: skip


@pytest.mark.parametrize(
    "axes, problem",
    [
        ({"guidance": [4]}, 'axes: unknown field "guidance" (did you mean "guidance_scale"?)'),
        ({"guidance_scale": [4, 4]}, "axes.guidance_scale: must be a non-empty list of distinct values"),
        ({"steps": [10, 0]}, "axes.steps[1]: must be between 1 and 1000"),
        ({"height": [20]}, "axes.height[0]: must be a positive multiple of 16 for this model, got 20"),
    ],
)
def test_a_bad_axis_is_named(tmp_path, axes, problem):
    with pytest.raises(JobFileError) as raised:
        load(tmp_path, {**OLD, "render": {}, "axes": axes})
    assert any(problem in error for error in raised.value.errors), raised.value.errors


def test_an_axis_is_given_in_one_place(tmp_path):
    with pytest.raises(JobFileError) as raised:
        load(tmp_path, {**OLD, "axes": {"guidance_scale": [4]}})
    problem = "axes.guidance_scale: also set in render: give it in one place"
    assert any(problem in error for error in raised.value.errors), raised.value.errors


def test_a_refining_round_on_further_axes_adds_each_sections_own_scale(tmp_path):
    """With axes, each section (a set at one combination) is refined at its own next scale: the
    round's cells are those of that combination alone, every prompt and seed."""
    from common.sweep_grid import axes_id, more_cells

    spec = {**OLD, "render": {}, "axes": {"steps": [10, 20]}, "refine": {"resolution": 0.1}}
    _, jobs, cells, report = load(tmp_path, spec)
    assert report["refine"] == {"resolution": 0.1, "rounds": 4} and len(cells) == 2 * 3 * 2 * 2
    path = tmp_path / "spec.json"
    at = {(0, axes_id({"steps": 10})): [0.25], (0, axes_id({"steps": 20})): [0.75]}
    more, added = more_cells(str(path), lambda alias: MODEL, resolver_for(), default_limits(), at, {"refined": 1})
    assert sorted((c.axes["steps"], c.lora_scale) for c in added) == [(10, 0.25)] * 4 + [(20, 0.75)] * 4
    assert all(job.steps == c.axes["steps"] and job.lora_scale == c.lora_scale for job, c in zip(more, added, strict=True))
    assert {job.key for job in more}.isdisjoint(job.key for job in jobs) and all(c.refined == 1 for c in added)


@pytest.mark.parametrize("scales", ["nan:1:0.1", "0:inf:0.5", "0:1:nan", "-inf:0:1"])
def test_a_range_of_scales_that_is_not_finite_is_named(tmp_path, scales):
    with pytest.raises(JobFileError, match=f'lora_scales: "{scales}" is not start:stop:step'):
        load(tmp_path, {**OLD, "lora_scales": scales})


def yaml_bomb(levels: int = 8) -> str:
    """A few hundred bytes of YAML whose aliases expand to 10**levels leaves."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: bomb\nprompts: *l{levels - 1}\nadapter_sets: [[]]\nlora_scales: *l{levels - 1}\n"


def test_a_spec_whose_aliases_expand_past_the_bound_is_refused_at_once(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(yaml_bomb())
    assert path.stat().st_size < 700
    started = time.monotonic()
    with pytest.raises(JobFileError, match="its aliases expand to more than 100000 values") as refused:
        load_sweep(str(path), lambda alias: MODEL, resolver_for(), default_limits())
    assert time.monotonic() - started < 2
    assert len(str(refused.value)) < 500


def test_an_error_quotes_at_most_a_line_of_a_long_value(tmp_path):
    with pytest.raises(JobFileError) as refused:
        load(tmp_path, {**OLD, "refine": {"resolution": 0.1, "rounds": list(range(50_000))}})
    (line,) = [line for line in str(refused.value).splitlines() if "refine.rounds" in line]
    assert len(line) < 200 and line.endswith("…"), line


def test_a_prompts_file_is_read_as_a_jobs_file_is(tmp_path):
    """prompts_file once went through a plain open: a FIFO hung the sweep, a bad line had no number."""
    import os

    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    with pytest.raises(JobFileError, match="not a regular file"):
        load(tmp_path, {**{k: v for k, v in OLD.items() if k != "prompts"}, "prompts_file": str(fifo)})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"a cat walks"\n{not json\n{"prompt": "a dog runs"}\n')
    with pytest.raises(JobFileError) as refused:
        load(tmp_path, {**{k: v for k, v in OLD.items() if k != "prompts"}, "prompts_file": str(prompts)})
    assert f"prompts_file: {prompts}: line 2: not valid JSON (Expecting property name enclosed in double quotes)" in str(refused.value)
    prompts.write_text('"a cat walks"\n{"prompt": "a dog runs"}\n')
    _, jobs, _, _ = load(tmp_path, {**{k: v for k, v in OLD.items() if k != "prompts"}, "prompts_file": str(prompts)})
    assert {job.prompt for job in jobs} == {"a cat walks", "a dog runs"}


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"nme": "x"}, 'spec: unknown field "nme" (did you mean "name"?)'),
        ({"name": "a/b"}, 'name: must be a plain name (no "/")'),
        ({"prompts": []}, "prompts: must be a non-empty list"),
        ({"prompts": ["a cat", {"prompt": "a dog", "x": 1}]}, 'prompts[1]: unknown field "x"'),
        ({"adapter_sets": [5]}, "adapter_sets: must be a non-empty list of adapter lists"),
        ({"adapter_sets": [[{"uri": "a", "weight": "x"}]]}, 'adapter_sets[0][0].weight: must be a number, got "x"'),
        ({"lora_scales": [0, "a", True]}, 'lora_scales[1]: must be a finite number, got "a"'),
        ({"lora_scales": [0, "a", True]}, "lora_scales[2]: must be a finite number, got true"),
        ({"lora_scales": [0, 10**400]}, "lora_scales[1]: must be a finite number, got 1000"),
        ({"seeds": [-1]}, "seeds: must be a non-empty list of integers ≥ 0"),
        ({"render": 5}, "render: must be a mapping of job fields"),
        ({"render": {"lora_scale": 1}}, "render.lora_scale: set by the sweep itself"),
        ({"suggest": {"clip_score_drp": 1}}, 'suggest: unknown field "clip_score_drp" (did you mean "clip_score_drop"?)'),
        ({"suggest": {"consistency_drop": -1}}, "suggest.consistency_drop: must be a finite number ≥ 0, got -1"),
        ({"moved": []}, 'moved: must be a mapping such as {"clip_score": 1.0,'),
        ({"confirm": 5}, "confirm: must be a mapping such as {model: 5b-fp8}"),
        ({"confirm": True}, "confirm.model: must differ from the sweep's own model (the draft)"),
        ({"refine": {"x": 1}}, "refine: must be a mapping such as {resolution: 0.05, rounds: 4}"),
        ({"refine": {"resolution": -1, "rounds": 0}}, "refine.resolution: must be a number > 0, got -1"),
        ({"refine": {"resolution": -1, "rounds": 0}}, "refine.rounds: must be a whole number from 1 to 10, got 0"),
        ({"priority": "urgent"}, "priority: must be one of 'high', 'normal' or 'low'"),
    ],
)
def test_each_problem_of_a_spec_is_named_at_its_place(tmp_path, change, problem):
    """A spec's shape is a model (SweepSpec): every field's problems come at once, each at its place."""
    with pytest.raises(JobFileError) as refused:
        load(tmp_path, {**OLD, **change})
    assert any(error.startswith(problem) for error in refused.value.errors), refused.value.errors


def test_a_yaml_key_that_is_not_a_name_is_named_not_a_traceback(tmp_path):
    """YAML keys can be numbers or null, which no field has: each is named like an unknown field."""
    path = tmp_path / "spec.yaml"
    path.write_text("prompts: [a cat walks]\nadapter_sets: [[]]\n5: x\nsuggest: {~: 1}\n")
    with pytest.raises(JobFileError) as refused:
        load_sweep(str(path), lambda alias: MODEL, resolver_for(), default_limits())
    assert sorted(refused.value.errors) == ['spec: unknown field "5"', 'suggest: unknown field "None"']
