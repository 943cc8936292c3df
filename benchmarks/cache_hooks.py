"""diffusers' cache hooks for DiTs against the exact render, on a full-size random CogVideoX, one GPU.

The draft tier of a nightly sweep (a cheaper render to pick with, exact renders to confirm) needs
one of diffusers' own cache hooks; which one is a measurement. Each run renders the same job (one
prompt, seed 0, CPU generator, the model's default size) through diffusers' own pipeline, exact
first, then with each hook enabled on the transformer (`enable_cache`) and disabled after, and
prints a table: seconds, ratio to the exact run, and how far the frames moved from the exact
frames (PSNR in dB, relative L2 error). On random weights the deviation is a proxy: a trained
model's features change more smoothly between steps, so hooks that key on that change cache more
(or less) there.

  python3 benchmarks/cache_hooks.py --model 5b --steps 50      # on the GPU machine
  python3 benchmarks/cache_hooks.py --model tiny --device cpu  # the script itself, in seconds

Notes on the hooks' defaults found here: TaylorSeer's default identifiers
(`^transformer_blocks.*attn`, matched whole) match no CogVideoX module (its attention is `attn1`),
so it is given `^transformer_blocks\\.\\d+\\.attn1$`; FasterCache and PAB read the pipeline's current
timestep, as diffusers' docs for CogVideoX configure them.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.full_size import build_pipeline  # noqa: E402

PROMPT = "a paper boat floats down a stream between mossy stones, morning light"


def hooks() -> dict:
    """The configurations compared, by name: each hook at the values diffusers documents, made for
    a pipeline (FasterCache and PAB read its current timestep)."""
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    return {
        "fastercache": lambda pipe: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=lambda: pipe.current_timestep, attention_weight_callback=lambda _: 0.3,
            unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781), tensor_format="BFCHW",
        ),
        "pab": lambda pipe: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep,
        ),
        "first-block-0.2": lambda pipe: FirstBlockCacheConfig(threshold=0.2),
        "taylorseer": lambda pipe: TaylorSeerCacheConfig(
            cache_interval=5, max_order=1, disable_cache_before_step=3, taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"^transformer_blocks\.\d+\.attn1$"],
        ),
    }  # fmt: skip


def render(pipe, steps: int, device: str) -> tuple[np.ndarray, float]:
    """The job's frames (float32, 0..1) and the seconds the pipeline call took."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    frames = pipe(
        prompt=PROMPT,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        max_sequence_length=pipe.transformer.config.max_text_seq_length,
    ).frames[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return np.asarray(frames, dtype=np.float32), time.perf_counter() - started


def deviation(frames: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """PSNR (dB, peak 1) and relative L2 error of frames against the exact frames."""
    mse = float(np.mean((frames - exact) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
    return psnr, float(np.linalg.norm(frames - exact) / np.linalg.norm(exact))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "2b", "5b"], default="5b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", nargs="*", help="these configurations only (default: all)")
    parser.add_argument("--again", action="store_true", help="render the exact job twice: bit for bit the same?")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"cache hooks on {where}; {args.model}, random weights, {args.steps} steps, the model's default size", flush=True)

    def fresh():
        # Each run gets a pipeline of its own (the same seeded weights): `disable_cache` was seen
        # to leave TaylorSeer's hooks in place, so no run inherits another's.
        if args.device == "cuda":
            torch.cuda.empty_cache()
        pipe = build_pipeline(args.model, args.device)
        pipe.set_progress_bar_config(disable=True)
        render(pipe, 2, args.device)  # warm-up: kernels chosen, memory reserved, before any timing
        return pipe

    pipe = fresh()
    exact, exact_s = render(pipe, args.steps, args.device)
    print("| run | s | ratio to exact | frames PSNR dB | rel. error |\n|---|---|---|---|---|", flush=True)
    print(f"| exact | {exact_s:.1f} | 1 | - | - |", flush=True)
    if args.again:
        again, again_s = render(pipe, args.steps, args.device)  # the same exact render: bit for bit?
        psnr, error = deviation(again, exact)
        print(f"| exact again | {again_s:.1f} | {again_s / exact_s:.3f} | {psnr:.1f} | {error:.4f} |", flush=True)
    for name, config in hooks().items():
        if args.only and name not in args.only:
            continue
        del pipe
        pipe = fresh()
        try:
            pipe.transformer.enable_cache(config(pipe))
            frames, seconds = render(pipe, args.steps, args.device)
        except Exception as exc:  # a hook that does not run on this model is a row, not the end
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | | |", flush=True)
            continue
        psnr, error = deviation(frames, exact)
        print(f"| {name} | {seconds:.1f} | {seconds / exact_s:.3f} | {psnr:.1f} | {error:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
