"""The memory planner: which arrangement a worker takes for its budget, and that every arrangement
renders what the resident one does. The real moves between host and GPU are tested in tests/gpu."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, DiffusionPipeline
from transformers import T5Config, T5EncoderModel

from benchmarks.full_size import CONFIGS, T5_XXL
from common.errors import MemoryBudgetError
from common.settings import Settings
from tests.unit.test_variants import make_job
from workers.memory import GB, PLAN_NAMES, PLANS, Footprint, choose, fit_problem
from workers.renderer import Renderer

pytestmark = pytest.mark.unit
DEFAULT = (49, 480, 720)


def full_size_footprint(name: str) -> Footprint:
    """The footprint of a full-size CogVideoX pipeline, weighed on the meta device (no memory)."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        pipe = SimpleNamespace(
            transformer=CogVideoXTransformer3DModel(**CONFIGS[name]).to(torch.bfloat16),
            vae=AutoencoderKLCogVideoX().to(torch.bfloat16),
            text_encoder=T5EncoderModel(T5Config(**T5_XXL)).to(torch.bfloat16),
            vae_scale_factor_spatial=8,
            vae_scale_factor_temporal=4,
        )
    return Footprint.of(pipe, 2048 * 2**20)


@pytest.fixture(scope="module")
def five_b() -> Footprint:
    return full_size_footprint("5b")


def test_the_weights_weigh_what_the_gpu_measured(five_b):
    # benchmarks/memory_tiers.py --calibrate on an H200: T5-XXL 9.52 GB, 5B transformer 11.14 GB, VAE 0.43 GB
    assert round(five_b.text_encoder / GB, 2) == 9.52
    assert round(five_b.transformer / GB, 2) == 11.14
    assert round(five_b.vae / GB, 2) == 0.43
    assert round(five_b.pristine / GB, 2) == 3.17  # DOMAIN.md: the targeted attention weights of 5B


@pytest.mark.parametrize(
    ("card_gb", "plan"),
    [
        (140, "resident"),
        (79, "resident"),  # an 80 GB card, less the CUDA context
        (47, "resident"),  # a 48 GB card: the untiled decode still fits
        (40, "vae-tiled"),
        (23, "text-encoder-offloaded"),  # a 24 GB card
        (21, "pristine-on-host"),
        (18, "model-offload"),
    ],
)
def test_a_5b_worker_takes_the_cheapest_plan_that_fits_its_card(five_b, card_gb, plan):
    chosen = choose(five_b, card_gb * GB, DEFAULT)
    assert chosen.name == plan
    assert five_b.peak(chosen, *DEFAULT) <= card_gb * GB
    cheaper = PLANS[: PLANS.index(chosen)]
    assert all(five_b.peak(p, *DEFAULT) > card_gb * GB for p in cheaper)


def test_each_plan_needs_less_than_the_one_before(five_b):
    peaks = [five_b.peak(plan, *DEFAULT) for plan in PLANS]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)


def test_a_card_too_small_for_any_plan_is_refused_with_what_it_would_take(five_b):
    with pytest.raises(
        ValueError, match=r"no memory plan fits 8\.0 GB at 49×480×720: even model-offload needs about 1\d\.\d GB"
    ):
        choose(five_b, 8 * GB, DEFAULT)


def test_a_named_plan_is_taken_whatever_the_budget(five_b):
    assert choose(five_b, 23 * GB, DEFAULT, "resident").name == "resident"
    assert PLAN_NAMES == list(Settings.model_fields["memory_plan"].annotation.__args__[1:])  # settings list them all


def test_a_job_too_large_for_the_plan_says_which_plan_would_fit(five_b):
    plan = choose(five_b, 79 * GB, DEFAULT)
    assert fit_problem(five_b, plan, 79 * GB, DEFAULT) is None
    problem = fit_problem(five_b, plan, 79 * GB, (81, 768, 1360))
    assert problem.startswith("81×768×1360 needs about ")
    assert "under memory plan resident, more than this worker's 79.0 GB budget" in problem
    assert problem.endswith("a worker with LORAFLEET_MEMORY_PLAN=vae-tiled would fit it")
    assert fit_problem(five_b, plan, None, (81, 768, 1360)) is None  # no budget, no check


# The tiny model on the CPU: the arrangements' moves are no-ops here, their logic is not.
SMALL_CACHE = {"adapter_device_cache_mb": 64}  # the budgets below are a tiny model's


@pytest.fixture(scope="module")
def budgeted(tiny, tmp_path_factory):
    """A renderer whose budget fits the tiny model's default size and untiled 16×16 frames, not more."""
    settings = Settings(adapter_cache_dir=str(tmp_path_factory.mktemp("cache")), gpu_memory_gb=1.0, **SMALL_CACHE)
    return Renderer(tiny["model"], "cpu", settings, "budgeted")


def test_prompt_embeddings_are_cached_and_render_what_diffusers_does(tiny, budgeted):
    job = make_job(budgeted, height=16, width=16)
    ours = np.stack(budgeted.render(job)[0])
    again = np.stack(budgeted.render(make_job(budgeted, height=16, width=16, seed=8))[0])
    stats = budgeted.prompts.lru.stats()
    assert (stats.misses, stats.hits) == (1, 1)  # T5 ran once for the two jobs
    assert not np.array_equal(ours, again)

    pipe = DiffusionPipeline.from_pretrained(tiny["model"])
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=job.prompt, num_frames=job.num_frames, height=16, width=16, num_inference_steps=job.steps,
        generator=torch.Generator("cpu").manual_seed(job.seed), output_type="np", max_sequence_length=16,
    ).frames[0]  # fmt: skip
    assert np.array_equal(ours, theirs)  # bit for bit: the same encode_prompt call as the pipeline's


def test_a_job_that_cannot_fit_the_budget_fails_before_rendering_with_the_reason(budgeted):
    rendered = budgeted.rendered
    with pytest.raises(MemoryBudgetError, match=r"^9×128×128 needs about .* GB of GPU memory under memory plan "):
        budgeted.render(make_job(budgeted, height=128, width=128))
    assert budgeted.rendered == rendered


def test_a_job_that_fits_only_in_tiles_is_decoded_in_tiles(tiny, tmp_path):
    settings = Settings(adapter_cache_dir=str(tmp_path), gpu_memory_gb=5.2, **SMALL_CACHE)
    renderer = Renderer(tiny["model"], "cpu", settings, "tiles")
    size = (9, 256, 384)  # more pixels than one VAE tile (240×360)
    assert renderer.plan.name == "resident" and fit_problem(renderer.footprint, renderer.plan, 5.2 * GB, size)
    vae, tiled = renderer.pipe.vae, []
    decode_in_tiles = vae.tiled_decode
    vae.tiled_decode = lambda *args, **kwargs: tiled.append(1) or decode_in_tiles(*args, **kwargs)  # counted, then run
    frames, _ = renderer.render(make_job(renderer, num_frames=9, height=256, width=384, steps=1))
    assert tiled, "the VAE did not decode in tiles"
    assert np.stack(frames).shape == (9, 256, 384, 3)
    assert not renderer.pipe.vae.use_tiling  # back as the plan has it


def test_a_worker_whose_budget_fits_no_plan_does_not_start(tiny, tmp_path):
    settings = Settings(adapter_cache_dir=str(tmp_path), gpu_memory_gb=0.1, **SMALL_CACHE)
    with pytest.raises(MemoryBudgetError, match=r"no memory plan fits 0\.1 GB at 9×16×16"):
        Renderer(tiny["model"], "cpu", settings, "small")
