"""Fused variants on the tiny model, fp32 on the CPU: exact switching, and agreement with diffusers."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from common.settings import Settings
from tests.helpers import prepare_job, resolver_for
from workers.renderer import Renderer

pytestmark = pytest.mark.unit

STEPS = 8


@pytest.fixture(scope="module")
def renderer(tiny, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("adapter-cache"))
    return Renderer(tiny["model"], "cpu", Settings(adapter_cache_dir=cache), "test")


def make_job(renderer, **fields) -> dict:
    job = {"prompt": "a cat walks along the beach", "seed": 7, "steps": STEPS, "height": 32, "width": 32, **fields}
    (finished,) = prepare_job(job, "test", renderer.info, resolver_for())
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


@pytest.fixture(scope="module")
def third(tiny, tmp_path_factory) -> str:
    """A third adapter, rank 3, on other layers than attention too: feed-forward and a norm."""
    from diffusers import CogVideoXPipeline

    from workers.tiny_model import adapter_layers

    transformer = DiffusionPipeline.from_pretrained(tiny["model"]).transformer
    layers = adapter_layers(transformer, 3, ["to_k"], seed=9)
    generator = torch.Generator().manual_seed(10)
    for name in ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.norm1.linear"):
        linear = transformer.get_submodule(name)
        layers[f"{name}.lora_A.weight"] = torch.randn(3, linear.in_features, generator=generator) * 0.3
        layers[f"{name}.lora_B.weight"] = torch.randn(linear.out_features, 3, generator=generator) * 0.3
    folder = str(tmp_path_factory.mktemp("third"))
    CogVideoXPipeline.save_lora_weights(folder, transformer_lora_layers=layers)
    return folder


COMBINATIONS = {
    "one": lambda tiny, third: [(tiny["style"], 0.8)],
    "three": lambda tiny, third: [(tiny["style"], 0.8), (tiny["subject"], 1.0), (third, 0.6)],
}


@pytest.mark.parametrize("lora_scale", [0.0, 0.5, 1.0, 1.7, -0.5])
@pytest.mark.parametrize("combination", ["one", "three"])
def test_fused_render_matches_diffusers(renderer, tiny, third, combination, lora_scale):
    pairs = COMBINATIONS[combination](tiny, third)
    adapters = [{"uri": uri, "weight": weight} for uri, weight in pairs]
    ours = frames(renderer, adapters=adapters, lora_scale=lora_scale)
    theirs = diffusers_frames(tiny, pairs, lora_scale, fuse=False)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    ours_unfused = frames(renderer, adapters=adapters, lora_scale=lora_scale, fuse=False)
    np.testing.assert_allclose(ours_unfused, theirs, atol=1e-4)
    np.testing.assert_allclose(ours_unfused, ours, atol=2e-3)


def test_switching_is_exact(renderer, tiny):
    a = {"adapters": [{"uri": tiny["style"], "weight": 0.8}], "lora_scale": 1.0}
    b = {"adapters": [tiny["subject"], tiny["style"]], "lora_scale": 0.5}
    first_a = frames(renderer, **a)
    frames(renderer, **b)
    frames(renderer, adapters=[tiny["subject"]], fuse=False)
    assert np.array_equal(frames(renderer, **a), first_a)

    assert not any("lora" in name for name, _ in renderer.pipe.transformer.named_modules())  # no wrappers left
    frames(renderer)  # back to the base
    fresh = DiffusionPipeline.from_pretrained(tiny["model"]).transformer.state_dict()
    now = renderer.pipe.transformer.state_dict()
    assert fresh.keys() == now.keys()
    assert all(torch.equal(fresh[name], now[name]) for name in fresh)


def test_a_thousand_random_switches_then_base_is_bit_identical(renderer, tiny, third):
    base_frames = frames(renderer)
    base_weights = base_state(renderer.pipe.transformer)
    uris = [tiny["style"], tiny["subject"], third]
    rng = np.random.default_rng(0)
    for _ in range(1000):
        chosen = rng.choice(3, size=rng.integers(1, 4), replace=False)
        adapters = [{"uri": uris[i], "weight": float(rng.uniform(-1, 2))} for i in chosen]
        job = make_job(renderer, adapters=adapters, lora_scale=float(rng.choice([0.0, 0.5, 1.0, 1.7, -0.5])))
        terms, variant = renderer._terms(job)
        renderer.variants.apply(terms, job.lora_scale, variant)
    assert renderer.variants.switches > 900
    assert np.array_equal(frames(renderer), base_frames)
    now = renderer.pipe.transformer.state_dict()
    assert all(torch.equal(now[name], base_weights[name]) for name in base_weights)


def test_caches_too_small_for_two_adapters_still_render_every_job_right(renderer, tiny, third, tmp_path):
    tight = Renderer(
        tiny["model"], "cpu",
        Settings(adapter_cache_dir=str(tmp_path), adapter_host_cache_mb=0, adapter_device_cache_mb=0, adapter_disk_cache_mb=0),
        "tight",
    )  # fmt: skip
    jobs = [
        {"adapters": [tiny["style"]]},
        {"adapters": [tiny["subject"], third]},
        {"adapters": [{"uri": tiny["style"], "weight": 0.5}, tiny["subject"]], "lora_scale": 1.7},
        {"adapters": [tiny["style"]]},
    ]
    for fields in jobs:
        assert np.array_equal(frames(tight, **fields), frames(renderer, **fields))
    stats = tight.cache_stats()
    assert stats.adapter_host.entries == 1 and stats.adapter_host.evictions >= 3
    assert stats.device_factors.entries == 1


def test_compiled_transformer_switches_without_recompiling(tiny, tmp_path):
    from workers.renderer import compiled_graphs

    settings = Settings(adapter_cache_dir=str(tmp_path), compile=True, compile_backend="aot_eager")
    compiled = Renderer(tiny["model"], "cpu", settings, "compiled")
    eager = Renderer(tiny["model"], "cpu", Settings(adapter_cache_dir=str(tmp_path)), "eager")
    first = frames(compiled, adapters=[tiny["style"]])
    graphs = compiled_graphs()
    assert graphs >= 1  # the transformer did run compiled
    for fields in ({"adapters": [tiny["subject"]], "lora_scale": 0.5}, {}, {"adapters": [tiny["style"]]}):
        np.testing.assert_allclose(frames(compiled, **fields), frames(eager, **fields), atol=1e-5)
    assert compiled_graphs() == graphs
    assert np.array_equal(frames(compiled, adapters=[tiny["style"]]), first)


def test_out_of_gpu_memory_retries_once_with_vae_tiling(renderer, monkeypatch):
    """No GPU here: the pipeline raises CUDA's out-of-memory error while the VAE is untiled, as a
    too-large decode would, and the render must come out right on the second try."""
    expected = frames(renderer)
    pipeline_call = type(renderer.pipe).__call__
    calls = []

    def out_of_memory_unless_tiled(pipe, *args, **kwargs):
        calls.append(pipe.vae.use_tiling)
        if not pipe.vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return pipeline_call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(renderer.pipe), "__call__", out_of_memory_unless_tiled)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert np.array_equal(frames(renderer), expected)  # the tiny video is below the VAE's tile size
    assert calls == [False, True] and not renderer.pipe.vae.use_tiling  # back as the settings say
