"""Attention and QKV kernels at CogVideoX's full-size shapes, side by side on one GPU (issues 13 and 28).

    python benchmarks/attention_kernels.py --model 5b [--step]

Attention is half of a denoising step's FLOPs. This times, for one transformer block of a CFG step
at the model's default size (49×480×720: 17,776 tokens of text and video, batch 2):

  sdpa               torch's scaled_dot_product_attention as diffusers calls it (torch picks)
  sdpa-cudnn/-flash/-efficient   the same, with one backend forced
  sdpa-bshd          torch's default on the strided views diffusers' processor really passes
  sdpa-fa4           torch's flash backend with FlashAttention-4 activated in it
                     (torch.nn.attention.activate_flash_attention_impl("FA4"))
  fa4                FlashAttention-4 called directly (PyPI flash-attn-4, CuTe DSL: its SM90 path)
  cudnn-fp8          cuDNN's FP8 attention through its Python frontend (per-tensor scales; Hopper
                     returns FP8), and "+quant": with the quantizing of Q, K, V and the dequantizing
                     of the output that a bf16 model must add around it
  sageattn           SageAttention, if installed: 1 (PyPI, Triton: INT8 Q·K, bf16 P·V) or 2 (built by
                     benchmarks/device_sage2.sh: on SM90 INT8 Q·K, FP8 P·V); not exact
  qkv-separate       the three Q, K, V projections as three matrix products (as the model runs them)
  qkv-fused          one matrix product with the three weights stacked (diffusers' fuse_qkv_projections)

and prints milliseconds per call, TFLOP/s, the seconds this costs a whole step (× the model's
blocks), and the output's relative error against fp32 attention (efficient kernel, fp32 inputs).
With --step it then times one whole CFG denoising step of the full-size random-weight transformer,
eager bf16, with each kernel that ran swapped in for torch's, and prints the step's seconds, its
ratio to torch's default and the output's relative error against it. A kernel that is not
installed, or does not run on this GPU, prints one line saying why and is left out.
Results: benchmarks/README.md.
"""

import argparse
import contextlib
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

TORCH_SDPA = F.scaled_dot_product_attention  # torch's own, whatever a whole step swaps in for it
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


def kernels_on(q, k, v) -> dict:
    """Each attention kernel reachable here, as a call on (batch, heads, tokens, 64) Q, K, V that
    returns what torch's `scaled_dot_product_attention` returns; a missing one says why."""
    kernels = {"sdpa": lambda q=q, k=k, v=v: TORCH_SDPA(q, k, v)}
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        kernels[f"sdpa-{name}"] = lambda q=q, k=k, v=v, backend=backend: forced(backend, q, k, v)
    for name, make in (("fa4", fa4), ("cudnn-fp8", cudnn_fp8), ("sageattn", sage), ("sdpa-fa4", sdpa_fa4)):
        try:
            kernels.update(make())
        except Exception as exc:  # not installed, or not for this GPU: say so, time the rest
            print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
    return kernels


def forced(backend, q, k, v):
    with sdpa_kernel(backend):
        return TORCH_SDPA(q, k, v)


def sdpa_fa4() -> dict:
    """torch's flash backend with FlashAttention-4 registered in the dispatcher: activated at its
    first call, after torch's own flash kernel was timed (it replaces that kernel process-wide)."""
    from torch.nn.attention import activate_flash_attention_impl

    active = []

    def call(q, k, v):
        if not active:
            activate_flash_attention_impl("FA4")
            active.append(True)
        return forced(SDPBackend.FLASH_ATTENTION, q, k, v)

    return {"sdpa-fa4": call}


def fa4() -> dict:
    """FlashAttention-4's own entry point, which takes (batch, tokens, heads, dim)."""
    from flash_attn.cute import flash_attn_func

    def call(q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    return {"fa4": call}


def cudnn_fp8() -> dict:
    """cuDNN's FP8 (e4m3) attention with per-tensor scales, through cudnn-frontend's Python graph."""
    import cudnn

    handle, graphs = cudnn.create_handle(), {}
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    fp8_max = torch.finfo(torch.float8_e4m3fn).max

    def graph_for(q8):
        key = (tuple(q8.shape), tuple(q8.stride()))
        if key not in graphs:
            graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
            dim, stride = list(q8.shape), list(q8.stride())
            qt, kt, vt = (graph.tensor(name=n, dim=dim, stride=stride, data_type=e4m3) for n in "qkv")
            scalars = [
                graph.tensor(name=f"s{n}", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32) for n in range(6)
            ]
            o, _, amax_s, amax_o = graph.sdpa_fp8(
                q=qt, k=kt, v=vt, descale_q=scalars[0], descale_k=scalars[1], descale_v=scalars[2],
                descale_s=scalars[3], scale_s=scalars[4], scale_o=scalars[5],
                is_inference=True, attn_scale=1.0 / math.sqrt(q8.shape[-1]), use_causal_mask=False,
            )  # fmt: skip
            o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(e4m3)
            for amax in (amax_s, amax_o):
                amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
            workspace = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)
            graphs[key] = (graph, (qt, kt, vt), scalars, (o, amax_s, amax_o), workspace)
        return graphs[key]

    def quantize(x):
        scale = fp8_max / x.abs().amax().float().clamp(min=1e-6)
        return (x * scale).to(torch.float8_e4m3fn), scale

    def attend(q8, k8, v8, descales, scale_o):
        graph, (qt, kt, vt), scalars, (o, amax_s, amax_o), workspace = graph_for(q8)
        out = torch.empty_like(q8)
        ones = lambda value: value.reshape(1, 1, 1, 1).float()  # noqa: E731
        pack = {qt: q8, kt: k8, vt: v8, o: out, amax_s: torch.empty(1, 1, 1, 1, device="cuda"),
                amax_o: torch.empty(1, 1, 1, 1, device="cuda")}  # fmt: skip
        # P is in [0, 1]: scale it to the fp8 range; O is a convex mix of V's rows, so |O| <= max|V|
        for tensor, value in zip(
            scalars, (*descales, torch.tensor(1 / fp8_max), torch.tensor(fp8_max), scale_o), strict=True
        ):
            pack[tensor] = ones(value.to("cuda"))
        graph.execute(pack, workspace, handle=handle)
        return out

    def with_quantizing(q, k, v):
        (q8, sq), (k8, sk), (v8, sv) = quantize(q), quantize(k), quantize(v)
        out = attend(q8, k8, v8, (1 / sq, 1 / sk, 1 / sv), sv)
        return (out.to(q.dtype) / sv).to(q.dtype)

    prepared = {}

    def kernel_only(q, k, v):  # the fp8 inputs made once, outside the timing
        key = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        if key not in prepared:
            prepared.clear()
            prepared[key] = quantize(q), quantize(k), quantize(v)
        (q8, sq), (k8, sk), (v8, sv) = prepared[key]
        out = attend(q8, k8, v8, (1 / sq, 1 / sk, 1 / sv), sv)
        return out.to(q.dtype) / sv

    return {"cudnn-fp8": kernel_only, "cudnn-fp8+quant": with_quantizing}


def sage() -> dict:
    from sageattention import sageattn

    return {"sageattn": lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)}


def attention(heads: int, blocks: int, repeats: int) -> tuple[list[tuple], dict]:
    """The attention kernels on one block's Q, K, V; also returns the kernels that ran."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, heads, TOKENS, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # fp32, without the 120 GB score matrix of "math"
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    attention_flop = 4 * 2 * heads * TOKENS**2 * 64
    # diffusers' processor views (batch, tokens, heads·64) projections as (batch, heads, tokens, 64)
    bshd = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    kernels = kernels_on(q, k, v)
    calls = {name: (lambda kernel=kernel: kernel(q, k, v)) for name, kernel in kernels.items()}
    calls["sdpa-bshd"] = lambda: F.scaled_dot_product_attention(*bshd)
    rows, working = [], {}
    for name, call in calls.items():
        try:
            error = float((call().float() - reference).norm() / reference.norm())
            ms = timed(call, repeats)
        except Exception as exc:  # a backend that does not take this shape on this GPU, a kernel that fails to build
            print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            continue
        rows.append((name, ms, attention_flop / ms / 1e9, ms * blocks / 1e3, error))
        if name in kernels:
            working[name] = kernels[name]
    # sdpa-fa4's first call put FA4 in place of torch's flash kernel, process-wide (and where it
    # failed, left it failing): torch's own back for the whole step, or no sdpa-flash step to mislabel
    restore = getattr(torch.nn.attention, "restore_flash_attention_impl", None)
    if "sdpa-fa4" in kernels and restore is not None:
        restore()
    elif "sdpa-fa4" in kernels:
        working.pop("sdpa-flash", None)
    return rows, working


@contextlib.contextmanager
def attention_kernel(kernel):
    """Every `F.scaled_dot_product_attention` call (diffusers' CogVideoX processor makes one per
    block) goes to `kernel` instead: a benchmark's swap, not how a worker would adopt one."""
    original = TORCH_SDPA

    def swapped(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if attn_mask is not None or dropout_p or is_causal or kwargs:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
        return kernel(q, k, v)

    F.scaled_dot_product_attention = swapped
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def whole_step(model: str, kernels: dict, repeats: int) -> list[tuple]:
    """One CFG step of the full-size random transformer, eager bf16, with each kernel swapped in."""
    from full_size import build_transformer

    transformer = build_transformer(model, "cuda", torch.bfloat16)
    config = transformer.config
    generator = torch.Generator("cpu").manual_seed(7)
    latents = torch.randn(2, 13, config.in_channels, 60, 90, generator=generator).to("cuda", torch.bfloat16)
    text = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=generator)
    rotary = None
    if config.use_rotary_positional_embeddings:  # as the pipeline prepares them, for 13 latent frames of 480×720
        from types import SimpleNamespace

        from diffusers import CogVideoXPipeline

        pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=transformer)
        rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, 480, 720, 13, torch.device("cuda"))

    def step():
        with torch.no_grad():
            return transformer(
                hidden_states=latents,
                encoder_hidden_states=text.to("cuda", torch.bfloat16),
                timestep=torch.full((2,), 500, device="cuda"),
                image_rotary_emb=rotary,
                return_dict=False,
            )[0]

    rows, reference = [], None
    # the kernel-only fp8 row reuses inputs quantized once: in a step only "+quant" is a real choice
    candidates = {n: k for n, k in kernels.items() if n not in ("sdpa", "cudnn-fp8")}
    for name, kernel in {"sdpa": None, **candidates}.items():
        swap = attention_kernel(kernel) if kernel else contextlib.nullcontext()
        try:
            with swap:
                out = step().float()
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(repeats):
                    step()
                torch.cuda.synchronize()
                seconds = (time.perf_counter() - started) / repeats
        except Exception as exc:
            print(f"step with {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            continue
        if reference is None:
            reference, base = out, seconds
        rows.append((name, seconds, seconds / base, float((out - reference).norm() / reference.norm())))
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
    parser.add_argument("--step", action="store_true", help="then time a whole CFG step with each kernel")
    parser.add_argument("--step-repeats", type=int, default=3)
    args = parser.parse_args()
    heads, blocks = SHAPES[args.model]
    attention_rows, working = attention(heads, blocks, args.repeats)
    rows = attention_rows + projections(heads * 64, blocks, args.repeats)

    print(
        f"\n{torch.cuda.get_device_name(0)}, {args.model}: batch 2, {heads} heads × 64, {TOKENS} tokens; torch {torch.__version__}"
    )
    print("| kernel | ms per block | TFLOP/s | s per step | rel. error |\n|---|---|---|---|---|")
    for name, ms, tflops, per_step, error in rows:
        print(f"| {name} | {ms:.2f} | {tflops:.0f} | {per_step:.3f} | {error:.2e} |")
    if args.step:
        print(
            f"\none CFG step of the {args.model} transformer (eager bf16, 49×480×720), each kernel swapped in",
            flush=True,
        )
        step_rows = whole_step(args.model, working, args.step_repeats)
        print("| kernel | s per step | ratio to sdpa | rel. error of the step's output |\n|---|---|---|---|")
        for name, seconds, ratio, error in step_rows:
            print(f"| {name} | {seconds:.3f} | {ratio:.3f} | {error:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
