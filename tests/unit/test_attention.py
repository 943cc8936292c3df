"""The attention kernel a model alias chooses: FA4's processor computes what diffusers' computes
(checked on the CPU with FA4's kernel stood in for by torch's SDPA in FA4's layout: FA4 itself
needs a Hopper GPU, where tests/gpu runs the real one), it enters the job key only when it is not
sdpa, and a worker that cannot run it says why before loading anything."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from common.errors import ModelError
from common.model import model_info
from common.settings import Settings

pytestmark = [pytest.mark.unit, pytest.mark.torch]


@pytest.fixture
def stand_in_for_fa4(monkeypatch):
    """`flash_attn.cute.flash_attn_func` as FA4 calls it ((batch, tokens, heads, dim) in and out), by SDPA."""

    def flash_attn_func(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)


def test_the_fa4_processor_computes_what_diffusers_computes(tiny, stand_in_for_fa4):
    from diffusers import CogVideoXTransformer3DModel

    from workers.attention import use_kernel

    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny["model"], subfolder="transformer").eval()
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    inputs = dict(
        hidden_states=torch.randn(2, 3, config.in_channels, 8, 8, generator=generator),
        encoder_hidden_states=torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=generator),
        timestep=torch.tensor([500, 500]),
        return_dict=False,
    )
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        use_kernel(transformer, "fa4")
        assert {type(p).__name__ for p in transformer.attn_processors.values()} == {"FlashAttention4Processor"}
        got = transformer(**inputs)[0]
        compiled = torch.compile(transformer, backend="aot_eager", fullgraph=True)(**inputs)[0]  # one graph: FA4 is an op
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_in_the_key_only_when_it_is_not_sdpa(tiny):
    from common.job_spec import check_job, expand_job
    from common.resolver import resolve_job

    keys = {}
    for kernel in ("sdpa", "fa4"):
        model = model_info(tiny["model"], attention=kernel)
        spec, errors = check_job({"prompt": "a cat", "seed": 1}, "job", model, 10**9)
        ((scale, seed),) = expand_job(spec)
        keys[kernel] = resolve_job(spec, scale, seed, model, resolver=None).key
    assert keys["fa4"] != keys["sdpa"]  # sdpa's keys are pinned as they were: tests/unit/test_job.py


def test_an_alias_names_its_kernel_and_a_worker_that_cannot_run_it_says_why(tiny, tmp_path):
    settings = Settings(models={"fast": {"ref": tiny["model"], "attention": "fa4"}}, attention="sdpa")
    assert settings.model_tier("fast").attention == "fa4"
    assert settings.model_tier(None).attention == "sdpa"
    with pytest.raises(ValueError, match="sdpa"):
        Settings(models={"bad": {"ref": tiny["model"], "attention": "flash"}})
    from workers.renderer import Renderer

    with pytest.raises(ModelError, match="needs a Hopper or Blackwell GPU"):
        Renderer(tiny["model"], "cpu", Settings(adapter_cache_dir=str(tmp_path)), "x", attention="fa4")
