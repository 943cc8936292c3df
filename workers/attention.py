"""The attention kernel a model alias runs (`"attention"` in LORAFLEET_MODELS, LORAFLEET_ATTENTION for
the default model): torch's `scaled_dot_product_attention` (`sdpa`, the default; cuDNN's kernel on
a Hopper GPU), or FlashAttention-4 (`fa4`, PyPI `flash-attn-4`, its CuTe DSL kernels for SM90 and
SM100).

Attention is half a CogVideoX step's FLOPs. On one H200, 5B at 49×480×720, one block's attention
took 14.2 ms with FA4 against 18.7 ms with cuDNN, and a whole eager step 1.60 s against 1.79 s
(benchmarks/attention_kernels.py). FA4 rounds differently (relative error 2.3e-3 against fp32,
as cuDNN's; 3.9e-3 between the two on a step's output): its pixels are not sdpa's, so the kernel
enters the job key (common/job.py) whenever it is not `sdpa`.
"""

import torch
from diffusers.models.attention_processor import Attention

from common.errors import ModelError

KERNELS = ("sdpa", "fa4")


@torch.library.custom_op("lorafleet::flash_attention_4", mutates_args=())
def flash_attention_4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention over (batch, heads, tokens, dim) inputs, as torch's SDPA takes them, by FA4; the
    output is (batch, tokens, heads, dim), FA4's own layout and the one the next projection wants.
    A custom op: torch.compile keeps it whole and compiles what is around it."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return (out[0] if isinstance(out, tuple) else out).contiguous()


@flash_attention_4.register_fake
def _(query, key, value):
    batch, heads, tokens, dim = query.shape
    return query.new_empty(batch, tokens, heads, dim)


def check_kernel(kernel: str, device: torch.device) -> None:
    """Raise ModelError, saying why, if this worker cannot run `kernel`."""
    if kernel not in KERNELS:
        raise ModelError(f'attention "{kernel}" is not one of {", ".join(KERNELS)}')
    if kernel == "sdpa":
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        raise ModelError('attention "fa4" needs a Hopper or Blackwell GPU (compute capability 9.x or 10.x)')
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            f"attention \"fa4\" needs the flash-attn-4 package (the fa4 extra: pip install 'lorafleet[fa4]'): {exc}"
        ) from None


def use_kernel(transformer: torch.nn.Module, kernel: str) -> None:
    """Make every attention layer of a CogVideoX transformer run `kernel`."""
    if kernel == "fa4":
        transformer.set_attn_processor(FlashAttention4Processor())


class FlashAttention4Processor:
    """CogVideoX's attention with FA4's kernel.

    Copied from diffusers' CogVideoXAttnProcessor2_0 (0.42.1), with its attention mask (CogVideoX
    passes none) left out and its `F.scaled_dot_product_attention` call replaced by
    `flash_attention_4`, which returns the tokens-first layout the output projection takes."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("FlashAttention4Processor takes no attention mask (CogVideoX passes none)")
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        hidden_states = flash_attention_4(query, key, value).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states
