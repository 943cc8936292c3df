"""Attention and QKV kernels at CogVideoX's full-size shapes, side by side on one GPU (issue 13, item 5).

    python benchmarks/attention_kernels.py --model 5b

Attention is half of a denoising step's FLOPs. This times, for one transformer block of a CFG step
at the model's default size (49×480×720: 17,776 tokens of text and video, batch 2):

  sdpa               torch's scaled_dot_product_attention as diffusers calls it (torch picks)
  sdpa-cudnn/-flash/-efficient   the same, with one backend forced
  sageattn           SageAttention 1 (PyPI, Triton: INT8 Q·K, bf16 P·V), if installed; not exact
  qkv-separate       the three Q, K, V projections as three matrix products (as the model runs them)
  qkv-fused          one matrix product with the three weights stacked (diffusers' fuse_qkv_projections)

and prints milliseconds per call, TFLOP/s, the seconds this costs a whole step (× the model's
blocks), and the output's relative error against fp32 attention (efficient kernel, fp32 inputs).
Results: benchmarks/README.md.
"""

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"2b": (30, 30), "5b": (48, 42)}  # heads (of 64 dims), blocks
TOKENS = 226 + 13 * 60 * 90 // 4  # text + 13 latent frames of 60×90 latents in 2×2 patches


def timed(call, repeats: int) -> float:
    """Median milliseconds of a GPU call, after a warm-up."""
    call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention(heads: int, blocks: int, repeats: int) -> list[tuple]:
    """The attention kernels on one block's Q, K, V."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, heads, TOKENS, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # fp32, without the 120 GB score matrix of "math"
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    attention_flop = 4 * 2 * heads * TOKENS**2 * 64
    kernels = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):

        def forced(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        kernels[f"sdpa-{name}"] = forced
    try:
        from sageattention import sageattn

        kernels["sageattn"] = lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    except ImportError as exc:
        print(f"sageattn: not installed ({exc})")
    rows = []
    for name, kernel in kernels.items():
        try:
            error = float((kernel().float() - reference).norm() / reference.norm())
            ms = timed(kernel, repeats)
        except Exception as exc:  # a backend that does not take this shape on this GPU, a kernel that fails to build
            print(f"{name}: {str(exc).splitlines()[0]}")
            continue
        rows.append((name, ms, attention_flop / ms / 1e9, ms * blocks / 1e3, error))
    return rows


def projections(width: int, blocks: int, repeats: int) -> list[tuple]:
    """One block's Q, K, V projections: three matrix products, or one of the stacked weights."""
    rows = []
    x = torch.randn(2 * TOKENS, width, device="cuda", dtype=torch.bfloat16)
    separate = [torch.nn.Linear(width, width, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    fused = torch.nn.Linear(width, 3 * width, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in separate]))
        fused.bias.copy_(torch.cat([layer.bias for layer in separate]))
        expected = torch.cat([layer(x) for layer in separate], dim=-1).float()
        projection_flop = 3 * 2 * x.shape[0] * width * width
        for name, call in (
            ("qkv-separate", lambda: [layer(x) for layer in separate]),
            ("qkv-fused", lambda: fused(x).chunk(3, dim=-1)),
        ):
            got = torch.cat(call(), dim=-1).float()
            error = float((got - expected).norm() / expected.norm())
            ms = timed(call, repeats)
            rows.append((name, ms, projection_flop / ms / 1e9, ms * blocks / 1e3, error))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="5b", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    heads, blocks = SHAPES[args.model]
    rows = attention(heads, blocks, args.repeats) + projections(heads * 64, blocks, args.repeats)

    print(
        f"\n{torch.cuda.get_device_name(0)}, {args.model}: batch 2, {heads} heads × 64, {TOKENS} tokens; torch {torch.__version__}"
    )
    print("| kernel | ms per block | TFLOP/s | s per step | rel. error |\n|---|---|---|---|---|")
    for name, ms, tflops, per_step, error in rows:
        print(f"| {name} | {ms:.2f} | {tflops:.0f} | {per_step:.3f} | {error:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
