"""Fused variants on the tiny model, fp32 on the CPU: exact switching, and agreement with diffusers."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from common.job import AdapterResolver, prepare_job
from common.settings import Settings
from workers.render import Renderer

pytestmark = pytest.mark.unit

STEPS = 8


@pytest.fixture(scope="module")
def renderer(tiny, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("adapter-cache"))
    return Renderer(tiny["model"], "cpu", Settings(adapter_cache_dir=cache, _env_file=None), "test")


def make_job(renderer, **fields) -> dict:
    job = {"prompt": "a cat walks along the beach", "seed": 7, "steps": STEPS, "height": 32, "width": 32, **fields}
    (finished,) = prepare_job(job, "test", renderer.info, AdapterResolver(None))
    return finished


def frames(renderer, **fields) -> np.ndarray:
    return np.stack(renderer.render(make_job(renderer, **fields))[0])


def diffusers_frames(tiny, adapters: list[tuple[str, float]], lora_scale: float, fuse: bool) -> np.ndarray:
    """The same render through diffusers' own pipeline and LoRA loading, as its docs show."""
    pipe = DiffusionPipeline.from_pretrained(tiny["model"])
    pipe.set_progress_bar_config(disable=True)
    names = [f"a{i}" for i in range(len(adapters))]
    for name, (path, _) in zip(names, adapters, strict=True):
        pipe.load_lora_weights(path, adapter_name=name)
    kwargs = {}
    if adapters:
        pipe.set_adapters(names, [weight for _, weight in adapters])
        if fuse:
            pipe.fuse_lora(lora_scale=lora_scale)
        else:
            kwargs["attention_kwargs"] = {"scale": lora_scale}
    out = pipe(
        prompt="a cat walks along the beach", num_frames=9, height=32, width=32, num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7), output_type="np", max_sequence_length=16, **kwargs,
    )  # fmt: skip
    return out.frames[0]


def base_state(transformer) -> dict:
    return {name: tensor.clone() for name, tensor in transformer.state_dict().items()}


def test_base_render_matches_diffusers_pipeline_exactly(renderer, tiny):
    assert np.array_equal(frames(renderer), diffusers_frames(tiny, [], 1.0, fuse=True))


def test_lora_scale_zero_renders_the_base(renderer, tiny):
    with_adapter = frames(renderer, adapters=[tiny["style"]], lora_scale=0)
    assert np.array_equal(with_adapter, frames(renderer))
    assert not np.allclose(frames(renderer, adapters=[tiny["style"]], lora_scale=1), with_adapter, atol=1e-3)


@pytest.mark.parametrize("lora_scale", [0.5, 1.0, 1.7, -0.5])
def test_fused_render_matches_diffusers(renderer, tiny, lora_scale):
    adapters = [{"uri": tiny["style"], "weight": 0.8}, {"uri": tiny["subject"], "weight": 1.0}]
    ours = frames(renderer, adapters=adapters, lora_scale=lora_scale)
    theirs = diffusers_frames(tiny, [(tiny["style"], 0.8), (tiny["subject"], 1.0)], lora_scale, fuse=False)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    ours_unfused = frames(renderer, adapters=adapters, lora_scale=lora_scale, fuse=False)
    np.testing.assert_allclose(ours_unfused, theirs, atol=1e-4)


def test_switching_is_exact(renderer, tiny):
    a = {"adapters": [{"uri": tiny["style"], "weight": 0.8}], "lora_scale": 1.0}
    b = {"adapters": [tiny["subject"], tiny["style"]], "lora_scale": 0.5}
    first_a = frames(renderer, **a)
    frames(renderer, **b)
    frames(renderer, adapters=[tiny["subject"]], fuse=False)
    assert np.array_equal(frames(renderer, **a), first_a)

    frames(renderer)  # back to the base
    fresh = DiffusionPipeline.from_pretrained(tiny["model"]).transformer.state_dict()
    now = renderer.pipe.transformer.state_dict()
    assert fresh.keys() == now.keys()
    assert all(torch.equal(fresh[name], now[name]) for name in fresh)
