"""The speed tiers on a real GPU: the fp8 tier's variants are the bf16 tier's fused weights,
quantized per row exactly as torchao quantizes a model, and come back bit for bit after any
switches; compiled fp8 switches variants without a new graph. Skipped without CUDA; run on the
device machine (see tests/gpu/test_fleet_on_gpu.py)."""

import numpy as np
import pytest
import torch

from common.settings import Settings
from tests.gpu.conftest import needs_gpu
from tests.helpers import prepare_job, resolver_for
from workers.fp8 import is_fp8
from workers.renderer import Renderer, compiled_graphs

pytestmark = [
    pytest.mark.gpu,
    needs_gpu((8, 9)),
]

JOBS = [
    {"prompt": "a cat", "seed": 1, "adapters": ["style"]},
    {"prompt": "a dog", "seed": 2, "adapters": ["style", "subject"], "lora_scale": 0.5},
    {"prompt": "a cat", "seed": 1, "adapters": ["subject"]},
    {"prompt": "a cat", "seed": 1, "adapters": ["style"]},  # back to the first variant
    {"prompt": "a cat", "seed": 1},  # and to the base
]


def render(renderer: Renderer, tiny, job: dict) -> np.ndarray:
    fields = {**job, "adapters": [tiny[name] for name in job.get("adapters", [])], "steps": 3}
    (finished,) = prepare_job(fields, "gpu", renderer.info, resolver_for())
    return np.stack(renderer.render(finished)[0])


def stored(renderer: Renderer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fp8 layers' data and scales as the model holds them now."""
    linears = renderer.variants.linears
    return {name: (m.weight.qdata.clone(), m.weight.scale.clone()) for name, m in linears.items() if is_fp8(m.weight)}


def quantized(renderer: Renderer, names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What torchao makes of this (bf16) renderer's weights, one layer at a time."""
    from torchao.quantization import Float8Tensor, PerRow

    out = {}
    for name in names:
        q = Float8Tensor.from_hp(renderer.variants.linears[name].weight.detach(), granularity=PerRow())
        out[name] = (q.qdata, q.scale)
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[n][0].view(torch.uint8), b[n][0].view(torch.uint8)) and torch.equal(a[n][1], b[n][1]) for n in a
    )


def test_fp8_variants_are_the_bf16_variants_quantized_bit_for_bit(tiny, tmp_path):
    settings = Settings(adapter_cache_dir=str(tmp_path))
    bf16 = Renderer(tiny["model"], "cuda", settings, "bf16")
    fp8 = Renderer(tiny["model"], "cuda", settings, "fp8", precision="fp8")
    assert fp8.info.precision == "fp8" and fp8.info != bf16.info  # another model identity: other keys
    base = stored(fp8)
    assert any(".attn1.to_q" in name for name in base)  # the adapters' layers are fp8
    assert same(base, quantized(bf16, base))
    seen = []
    for job in JOBS:
        ours = render(fp8, tiny, job)
        render(bf16, tiny, job)
        assert np.isfinite(ours).all()
        seen.append(stored(fp8))
        assert same(seen[-1], quantized(bf16, base)), job
    assert same(seen[3], seen[0]) and same(seen[4], base)
    assert not same(seen[0], base)


def test_compiled_fp8_switches_variants_without_a_new_graph(tiny, tmp_path):
    settings = Settings(
        adapter_cache_dir=str(tmp_path), store_url=str(tmp_path / "store"), compile_cache_secret="fleet"
    )
    compiled = Renderer(tiny["model"], "cuda", settings, "compiled", precision="fp8", compiled=True)
    graphs = compiled_graphs()
    base, *variants = [render(compiled, tiny, job) for job in [{"prompt": "a cat", "seed": 1}, *JOBS]]
    assert compiled_graphs() == graphs  # the default size, every variant: the one graph compiled at start
    # The graph reads the weights written in place: each variant renders its own frames, and the
    # same ones when it comes back.
    assert np.array_equal(variants[3], variants[0]) and np.array_equal(variants[4], base)
    assert not any(np.array_equal(base, frames) for frames in variants[:3])
    assert list((tmp_path / "store" / "compile-cache").glob("*.bin"))  # shared, signed, for the next worker
    # torchao's recommended settings (coordinate-descent tuning) made a 5B compile take minutes, and
    # would have applied to every renderer in the process: quantizing leaves inductor's config alone.
    assert not torch._inductor.config.coordinate_descent_tuning
