"""The attention kernel a model alias chooses: FA4's processor computes what diffusers' computes
(checked on the CPU with FA4's kernel stood in for by torch's SDPA in FA4's layout: FA4 itself
needs a Hopper GPU, where tests/gpu runs the real one), it enters the job key only when it is not
sdpa, and a worker that cannot run it says why before loading anything."""

import inspect
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


def statements(function) -> list[str]:
    """A function's lines as code: stripped, without its docstring, comments and blank lines."""
    found, in_docstring = [], False
    for line in (line.strip() for line in inspect.getsource(function).splitlines()):
        if line.startswith('"""'):
            in_docstring = in_docstring != (line.count('"""') == 1)
        elif line and not line.startswith("#") and not in_docstring:
            found.append(line)
    return found


# What workers/attention.py's copy of diffusers' CogVideoXAttnProcessor2_0 says it changed: the mask
# left out (CogVideoX passes none: refused instead), FA4's call in place of SDPA's (FA4 returns the
# tokens-first layout), an absolute import, and the annotation of what both return.
REPLACED = [
    ") -> torch.Tensor:",
    "batch_size, sequence_length, _ = hidden_states.shape",
    "if attention_mask is not None:",  # preparing the mask; the copy refuses one at its start
    "attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)",
    "attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])",
    "inner_dim = key.shape[-1]",
    "head_dim = inner_dim // attn.heads",
    "from .embeddings import apply_rotary_emb",
    "hidden_states = F.scaled_dot_product_attention(",
    "query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False",
    ")",  # the end of that call
    "hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)",
]
ADDED = [
    ") -> tuple[torch.Tensor, torch.Tensor]:",
    "if attention_mask is not None:",
    'raise ValueError("FlashAttention4Processor takes no attention mask (CogVideoX passes none)")',
    "batch_size = hidden_states.shape[0]",
    "head_dim = key.shape[-1] // attn.heads",
    "from diffusers.models.embeddings import apply_rotary_emb",
    "hidden_states = flash_attention_4(query, key, value).reshape(batch_size, -1, attn.heads * head_dim)",
]


def test_the_fa4_processor_is_still_a_copy_of_diffusers_own():
    """workers/attention.py says it is copied from diffusers' CogVideoXAttnProcessor2_0 with these
    changes: checked against the installed diffusers' source, as diffusers' own `make fix-copies`
    does, so a change upstream (a new norm, another rotary path) fails here instead of silently
    leaving the FA4 tier behind."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    from workers.attention import FlashAttention4Processor

    assert without(statements(CogVideoXAttnProcessor2_0.__call__), REPLACED) == without(
        statements(FlashAttention4Processor.__call__), ADDED
    )


def without(lines: list[str], taken: list[str]) -> list[str]:
    """`lines` less one occurrence of each line in `taken` (each must be there)."""
    left = list(lines)
    for line in taken:
        left.remove(line)
    return left
