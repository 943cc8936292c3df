"""A draft tier's cache hook (common/settings.py: DraftCache) on a pipeline's transformer.

diffusers' own hooks, configured for CogVideoX: TaylorSeer on each block's self-attention (its
default identifiers name no CogVideoX module, so with them it hooks nothing), FasterCache and PAB
as diffusers documents them for CogVideoX, First-Block-Cache as it comes. Under torch.compile a
hook's step counters would make a new graph each step: the hooked modules run eagerly instead,
and the rest of each block stays compiled.
"""

import torch

from common.errors import ModelError
from common.settings import DraftCache

SELF_ATTENTION = r"^transformer_blocks\.\d+\.attn1$"  # CogVideoX's one attention per block


def cache_config(cache: DraftCache, pipe):
    """The diffusers config of a draft tier's hook; FasterCache and PAB follow the pipeline's timestep."""
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    p = cache.params
    timestep = lambda: pipe.current_timestep  # noqa: E731
    if cache.hook == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=int(p["cache_interval"]), max_order=int(p["max_order"]),
            disable_cache_before_step=int(p["disable_cache_before_step"]),
            taylor_factors_dtype=torch.bfloat16 if p["factors_bits"] == 16 else torch.float32,
            cache_identifiers=[SELF_ATTENTION],
        )  # fmt: skip
    if cache.hook == "fastercache":
        weight = p["attention_weight"]
        return FasterCacheConfig(
            spatial_attention_block_skip_range=int(p["spatial_attention_block_skip_range"]),
            spatial_attention_timestep_skip_range=(-1, 681), current_timestep_callback=timestep,
            attention_weight_callback=lambda _: weight,
            unconditional_batch_skip_range=int(p["unconditional_batch_skip_range"]),
            unconditional_batch_timestep_skip_range=(-1, 781), tensor_format="BFCHW",
        )  # fmt: skip
    if cache.hook == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(p["spatial_attention_block_skip_range"]),
            spatial_attention_timestep_skip_range=(100, 800), current_timestep_callback=timestep,
        )  # fmt: skip
    return FirstBlockCacheConfig(threshold=p["threshold"])


def enable_draft_cache(pipe, cache: DraftCache) -> None:
    """Put the hook on the transformer. Each hooked block or module runs outside torch.compile,
    its outputs made contiguous: a cached output is a new tensor where the computed one is a view,
    and the compiled code after it would otherwise recompile for each."""
    transformer = pipe.transformer
    if cache.hook == "first-block" and len(transformer.transformer_blocks) < 2:
        raise ModelError("the first-block cache hook needs a transformer of at least two blocks")
    transformer.enable_cache(cache_config(cache, pipe))
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.hooks and module is not transformer:
            module.forward = torch.compiler.disable(_contiguous_outputs(module.forward))


def _contiguous_outputs(forward):
    def contiguous(*args, **kwargs):
        output = forward(*args, **kwargs)
        if isinstance(output, tuple):
            return tuple(o.contiguous() if isinstance(o, torch.Tensor) else o for o in output)
        return output.contiguous() if isinstance(output, torch.Tensor) else output

    return contiguous


def reset_draft_cache(pipe) -> None:
    """Forget what the hook kept from the last render: the pipeline does this when a render ends,
    not when one stopped midway (a cancel, an error), and the next job must not start from it."""
    pipe.transformer._reset_stateful_cache()
