"""The job schema, its errors, expansion and key (docs/design.md)."""

import json
import math
import os
import shutil
import time
from dataclasses import replace

import pytest

from common.errors import JobError, JobFileError
from common.job import Job, JobContent, ResolvedAdapter, ResolvedImage, job_key
from common.job_spec import check_job, expand_job
from common.jobs_file import job_from_message, load_jobs
from common.model import ModelInfo
from common.resolver import AdapterResolver
from common.settings import DraftCache, Settings
from common.store import Store
from tests.helpers import default_limits, default_policy, prepare_job, resolver_for, write_lora

pytestmark = pytest.mark.unit

MODEL = ModelInfo(
    ref="/models/tiny", scheduler="CogVideoXDPMScheduler", num_frames=9, height=16, width=16,
    frame_step=8, size_step=16, max_text_tokens=16,
)  # fmt: skip


PIXELS = 100_000_000  # LORAFLEET_MAX_VIDEO_PIXELS' default


def model_for(alias):
    return MODEL


def write_jobs(tmp_path, *lines) -> str:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def errors_of(tmp_path, *lines) -> list[str]:
    with pytest.raises(JobFileError) as raised:
        load_jobs(write_jobs(tmp_path, *lines), model_for, resolver_for(Store(str(tmp_path / "store"))), default_limits())
    return raised.value.errors


def test_defaults_fill_in_from_design_and_model():
    job, errors = check_job({"prompt": "a cat", "seed": 5}, "line 1", MODEL, PIXELS)
    assert errors == []
    assert (job.num_frames, job.height, job.width) == (9, 16, 16)
    assert (job.steps, job.guidance_scale, job.fps, job.fuse, job.use_dynamic_cfg) == (
        50,
        6.0,
        8,
        True,
        False,
    )
    assert job.adapters == [] and job.negative_prompt == "" and job.lora_scale == [1.0]


def test_unknown_field_names_line_and_suggests(tmp_path):
    errors = errors_of(tmp_path, {"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "lora_sacle": 1})
    assert errors == ['line 3: unknown field "lora_sacle" (did you mean "lora_scale"?)']


def test_every_bad_line_is_reported_at_once(tmp_path):
    errors = errors_of(
        tmp_path,
        "{not json",
        {"prompt": ""},
        {"prompt": "x", "lora_scale": float("nan")},
        {"prompt": "x", "seed": -1},
        {"prompt": "x", "num_frames": 10},
        {"prompt": "x", "height": 20},
        {"prompt": "x", "steps": 0, "fps": 500},
        {"prompt": "x", "fuse": "yes"},
        {"prompt": "x", "adapters": [{"uri": "a", "wieght": 2}]},
        '["a list"]',
    )
    assert errors[0].startswith("line 1: not valid JSON")
    assert "line 2: prompt: required, a non-empty string" in errors
    assert "line 3: lora_scale: must be a finite number, got nan" in errors
    assert "line 4: seed: must be between 0 and 9223372036854775807, got -1" in errors
    assert any(e.startswith("line 5: num_frames: must be 8·N+1") for e in errors)
    assert any(e.startswith("line 6: height: must be a positive multiple of 16") for e in errors)
    assert "line 7: steps: must be between 1 and 1000, got 0" in errors
    assert "line 7: fps: must be between 1 and 120, got 500" in errors
    assert 'line 8: fuse: must be true or false, got "yes"' in errors
    assert 'line 9: adapters[0]: unknown field "wieght" (did you mean "weight"?)' in errors
    assert "line 10: a job must be a JSON object, got list" in errors


def test_infinite_and_huge_values_are_refused():
    for field, value in (("lora_scale", math.inf), ("guidance_scale", -math.inf), ("seed", 2**70), ("width", 10**9)):
        _, errors = check_job({"prompt": "x", field: value}, "line 1", MODEL, PIXELS)
        assert len(errors) == 1 and errors[0].startswith(f"line 1: {field}:"), errors


def test_missing_adapter_names_what_was_checked(tmp_path):
    errors = errors_of(tmp_path, {"prompt": "x", "adapters": ["nowhere/style"]})
    assert len(errors) == 1
    assert errors[0].startswith('line 1: adapter "nowhere/style" not found (checked ')
    assert "nowhere/style/pytorch_lora_weights.safetensors" in errors[0]


def test_empty_file_is_an_error(tmp_path):
    assert errors_of(tmp_path) == ["no jobs: the file is empty"]


def test_lists_expand_and_missing_seed_is_drawn_once():
    job, errors = check_job({"prompt": "x", "lora_scale": [0, 0.5, 1], "seed": [1, 2]}, "line 1", MODEL, PIXELS)
    assert not errors
    expanded = expand_job(job)
    assert expanded == [(s, seed) for s in (0.0, 0.5, 1.0) for seed in (1, 2)]

    job, _ = check_job({"prompt": "x", "lora_scale": [0, 1]}, "line 1", MODEL, PIXELS)
    seeds = {seed for _, seed in expand_job(job)}
    assert len(seeds) == 1  # one draw for the whole line, written into every job


@pytest.fixture
def adapter_file(tmp_path):
    return write_lora(tmp_path / "adapters" / "style", seed=1)


@pytest.fixture
def loras(tmp_path) -> dict:
    """Two adapters written by hand (no torch), as `tiny` names its two."""
    return {name: write_lora(tmp_path / "loras" / name, seed=i) for i, name in enumerate(("style", "subject"))}


def key_of(job: dict, tmp_path) -> str:
    (finished,) = prepare_job(job, "line 1", MODEL, resolver_for(Store(str(tmp_path / "store"))))
    return finished.key


def test_key_is_stable_and_ignores_id_and_adapter_path(tmp_path, adapter_file):
    job = {"prompt": "a cat", "seed": 3, "adapters": [{"uri": adapter_file, "weight": 0.7}]}
    key = key_of(job, tmp_path)
    assert key == key_of(dict(job), tmp_path)
    assert key == key_of({**job, "id": "my label"}, tmp_path)
    moved = str(tmp_path / "elsewhere.safetensors")
    shutil.copy(os.path.join(adapter_file, "pytorch_lora_weights.safetensors"), moved)
    assert key == key_of({**job, "adapters": [{"uri": moved, "weight": 0.7, "name": "renamed"}]}, tmp_path)


def test_adapter_order_does_not_change_the_key(tmp_path, loras):
    a = {"uri": loras["style"], "weight": 0.5}
    b = {"uri": loras["subject"], "weight": 1.0}
    assert key_of({"prompt": "x", "seed": 1, "adapters": [a, b]}, tmp_path) == key_of(
        {"prompt": "x", "seed": 1, "adapters": [b, a]}, tmp_path
    )


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a dog"}, {"negative_prompt": "blurry"}, {"seed": 4}, {"lora_scale": 0.5},
        {"num_frames": 17}, {"height": 32}, {"width": 32}, {"steps": 20}, {"guidance_scale": 5.0},
        {"use_dynamic_cfg": True}, {"fps": 12}, {"fuse": False},
        {"adapters": [{"uri": "STYLE", "weight": 0.8}]}, {"adapters": [{"uri": "STYLE", "weight": 0.7, "alpha": 2}]},
        {"adapters": []},
    ],
)  # fmt: skip
def test_every_decisive_field_changes_the_key(tmp_path, adapter_file, change):
    job = {"prompt": "a cat", "seed": 3, "adapters": [{"uri": adapter_file, "weight": 0.7}]}
    change = json.loads(json.dumps(change).replace("STYLE", adapter_file))
    assert key_of(job, tmp_path) != key_of({**job, **change}, tmp_path)


def test_model_identity_is_part_of_the_key(tmp_path):
    (job,) = prepare_job({"prompt": "x", "seed": 1, "adapters": [], "lora_scale": 1.0}, "line 1", MODEL)
    other = ModelInfo(**{**MODEL.__dict__, "ref": "/models/other"})
    assert job_key(job, MODEL) != job_key(job, other)


def test_a_draft_tier_is_keyed_apart_by_its_hook_and_parameters():
    (job,) = prepare_job({"prompt": "x", "seed": 1, "adapters": [], "lora_scale": 1.0}, "line 1", MODEL)
    taylorseer = DraftCache(hook="taylorseer")
    drafts = [replace(MODEL, cache=cache.identity()) for cache in (taylorseer, DraftCache(hook="pab"))]
    drafts.append(replace(MODEL, cache=DraftCache(hook="taylorseer", params={"cache_interval": 3}).identity()))
    drafts.append(replace(MODEL, cache=DraftCache(hook="taylorseer", params={"factors_bits": 16}).identity()))
    assert len({job_key(job, model) for model in [MODEL, *drafts]}) == 5  # a draft never stands in for exact
    # Its defaults are written into the key: the same settings given or left out are one key.
    assert taylorseer.identity() == DraftCache(hook="taylorseer", params={"cache_interval": 5}).identity()
    assert taylorseer.params == {"cache_interval": 5, "max_order": 1, "disable_cache_before_step": 3, "factors_bits": 32}
    # factors_bits came after drafts were rendered: at their value (32) it leaves their keys as they were.
    assert taylorseer.identity() == '{"hook":"taylorseer","params":{"cache_interval":5,"disable_cache_before_step":3,"max_order":1}}'


@pytest.mark.parametrize(
    "given, problem",
    [
        ({"hook": "teacache"}, "Input should be 'taylorseer'"),
        ({"hook": "pab", "params": {"cache_interval": 2}}, "pab has no parameter cache_interval"),
        ({"hook": "taylorseer", "params": {"cache_interval": 2.5}}, "must be a whole number, got 2.5"),
        ({"hook": "taylorseer", "params": {"factors_bits": 8}}, "factors_bits: one of 16, 32, got 8"),
        ({"hook": "first-block", "params": {"threshold": math.nan}}, "must be a finite number ≥ 0, got NaN"),
    ],
)
def test_a_draft_tier_says_what_is_wrong_with_it(given, problem):
    with pytest.raises(ValueError, match=problem):
        Settings(models={"draft": {"ref": "/models/tiny", "cache": given}})


FIVE_B = ModelInfo("THUDM/CogVideoX-5b", "CogVideoXDPMScheduler", 49, 480, 720, 8, 16, 226)
FIVE_B_I2V = ModelInfo("THUDM/CogVideoX-5b-I2V", "CogVideoXDPMScheduler", 49, 480, 720, 8, 16, 226, takes_image=True)
RENDER = dict(num_frames=49, height=480, width=720, steps=50, guidance_scale=6.0, use_dynamic_cfg=False, fps=8, fuse=True)


@pytest.mark.parametrize(
    "fields, model, key",
    [
        ({"prompt": "a cat", "seed": 1, "lora_scale": 1.0}, FIVE_B,
         "f466e3e244f99be5167f51f0d3436860d33729e68732b789bd51cef989988167"),  # 6bc2f52's: before images existed
        ({"prompt": "a cat", "seed": 7, "lora_scale": 0.5, "adapters": (
            ResolvedAdapter(uri="s3://loras/style", weight=0.7, alpha=64.0, url="s3://loras/style/w.safetensors",
                            sha256="ab" * 32),
            ResolvedAdapter(uri="s3://loras/subject", name="subject", url="s3://loras/subject/w.safetensors",
                            sha256="cd" * 32))}, FIVE_B,
         "f7c0283d37edf7e8ed54d56579b02c7f4e08d2610db7e5781b6c77fa916dd8d1"),
        ({"prompt": "a cat", "seed": 1, "lora_scale": 1.0,
          "image": ResolvedImage(uri="inputs/cat.png", url="/data/inputs/cat.png", sha256="ef" * 32)}, FIVE_B_I2V,
         "5d81b38cd9db2300eb864bf70bea1f50f629f4a334b2cce6cf2798e59b52492a"),
    ],
    ids=["t2v", "t2v-two-adapters", "i2v"],
)  # fmt: skip
def test_keys_stay_what_they_were(fields, model, key):
    """Keys computed by 1dbe2e3's dict code: the typed Job keys every stored video as before, so
    nothing in a store is rendered again (paths, names and ids do not enter the key)."""
    job = Job.keyed(dict(JobContent(**fields, **RENDER)), model)
    assert job.key == key
    assert Job.model_validate(job.message()) == job  # the wire round trip keeps the job whole
    assert job_key(job, replace(model, precision="fp8")) != key  # fp8 renders other pixels


def test_at_lora_scale_zero_every_adapter_combination_shares_the_base_key(tmp_path, loras):
    base = key_of({"prompt": "x", "seed": 1, "lora_scale": 0}, tmp_path)
    assert base == key_of({"prompt": "x", "seed": 1, "lora_scale": 0, "adapters": [loras["style"]]}, tmp_path)
    assert base == key_of(
        {"prompt": "x", "seed": 1, "lora_scale": 0, "adapters": [loras["subject"], loras["style"]]}, tmp_path
    )
    assert base != key_of({"prompt": "x", "seed": 1, "lora_scale": 0.5, "adapters": [loras["style"]]}, tmp_path)


def test_a_message_key_is_always_derived_from_its_content(tmp_path, adapter_file):
    """Whoever can write to Redis is a client: a message's key is checked, never trusted."""
    resolver = resolver_for(Store(str(tmp_path / "store")))
    message = {"prompt": "a cat", "seed": 3, "adapters": [adapter_file]}
    derived = job_from_message(message, MODEL, resolver, PIXELS)
    assert job_from_message({**message, "key": derived.key}, MODEL, resolver, PIXELS).key == derived.key
    forged = "0" * 64
    with pytest.raises(JobError, match=f"the message says {forged} but its content hashes to {derived.key}"):
        job_from_message({**message, "key": forged}, MODEL, resolver, PIXELS)
    # A producer's message names each adapter's file and hash: the key follows the hash it names.
    producer_style = derived.message()
    assert job_from_message(producer_style, MODEL, resolver, PIXELS) == derived
    other_hash = [{**producer_style["adapters"][0], "sha256": "f" * 64}]
    with pytest.raises(JobError, match="but its content hashes to"):
        job_from_message({**producer_style, "adapters": other_hash}, MODEL, resolver, PIXELS)


def test_a_message_naming_a_file_outside_the_policy_is_refused(tmp_path):
    resolver = AdapterResolver(default_policy(schemes=("s3",)))
    adapter = {"uri": "x", "url": "/etc/passwd", "sha256": "a" * 64}
    with pytest.raises(JobError, match="outside the allowed locations"):
        job_from_message({"prompt": "x", "seed": 1, "adapters": [adapter]}, MODEL, resolver, PIXELS)
    with pytest.raises(JobError, match="job: batch: must be 1 to 128 letters"):
        job_from_message({"prompt": "x", "seed": 1, "batch": "a\nb"}, MODEL, resolver, PIXELS)


def test_a_file_asking_for_millions_of_jobs_is_refused_before_any_is_built(tmp_path):
    line = {"prompt": "x", "seed": list(range(4000)), "lora_scale": [i / 4000 for i in range(4000)]}
    started = time.monotonic()
    assert errors_of(tmp_path, line) == [
        "the file expands to 16000000 jobs, more than 100000 (LORAFLEET_MAX_JOBS): split it"
    ]
    assert time.monotonic() - started < 5  # counted, not built: 16 million dicts would take minutes and GBs


def test_settings_reach_a_supervisors_workers_and_unset_ones_stay_unset(monkeypatch):
    from common.settings import Settings, settings_env

    monkeypatch.setenv("LORAFLEET_EVAL_CLIP", "left over from the shell")
    env = settings_env(Settings(model="/models/x", metrics_port=None, eval_clip=None))
    assert env["LORAFLEET_MODEL"] == "/models/x"
    assert "LORAFLEET_METRICS_PORT" not in env and "LORAFLEET_EVAL_CLIP" not in env  # not the string "None"


@pytest.mark.parametrize(
    "hook, parameter",
    [
        ("taylorseer", "cache_interval"),
        ("pab", "spatial_attention_block_skip_range"),
        ("fastercache", "spatial_attention_block_skip_range"),
        ("fastercache", "unconditional_batch_skip_range"),
    ],
)
def test_a_draft_parameter_that_diffusers_divides_by_is_refused_at_0_naming_the_alias(hook, parameter, tmp_path):
    """Accepted at 0 once, every job of the tier then failed with ZeroDivisionError."""
    import subprocess
    import sys

    models = {"draft": {"ref": "/models/tiny", "cache": {"hook": hook, "params": {parameter: 0}}}}
    env = {**os.environ, "LORAFLEET_MODELS": json.dumps(models), "LORAFLEET_STORE_URL": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "lorafleet", "batches"], env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("lorafleet: LORAFLEET_MODELS: draft.cache: ") and f"{parameter}: must be at least 1" in line
