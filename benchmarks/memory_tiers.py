"""GPU memory tiers: what each arrangement of a worker costs, on emulated 24, 48 and 80 GB cards.

    python benchmarks/memory_tiers.py --calibrate --models 2b 5b     # the planner's numbers (workers/memory.py)
    python benchmarks/memory_tiers.py --model 5b --budgets 79 47 23  # the tier table

The tier table: a full-size random-weight pipeline (written to --folder if absent), then per budget
one process under `torch.cuda.set_per_process_memory_fraction(budget)`: a lorafleet Renderer whose
planner picks the plan for that budget, and diffusers' own pipeline with model CPU offload and VAE
tiling at the smallest budget (`--diffusers-resident`: also diffusers all on the GPU). Each renders
a 2-step warm-up job and then the measured one (another adapter, a new prompt), and reports the
plan, estimated and measured peaks, seconds per job and the ratio to the resident plan.

`--calibrate` builds full-size random-weight components on the GPU and prints, per shape, the
memory each phase of a render adds on top of the weights: the T5 encoder's pass, one CFG step of
the transformer (batch 2), and the VAE decode untiled and tiled+sliced. workers/memory.py's
coefficients come from this table. Results: benchmarks/README.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 1e9
SHAPES = {
    "2b": [(49, 480, 720), (25, 480, 720), (49, 240, 360)],
    "5b": [(49, 480, 720), (25, 480, 720), (49, 240, 360)],
}


def added_peak(run, *args, **kwargs) -> float:
    """Bytes `run(*args, **kwargs)` allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        run(*args, **kwargs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def calibrate(name: str) -> list[dict]:
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    from benchmarks.full_size import T5_XXL, build_transformer

    dtype, device = torch.bfloat16, torch.device("cuda")
    with torch.device(device):
        text_encoder = T5EncoderModel(T5Config(**T5_XXL)).to(dtype).eval()
        vae = AutoencoderKLCogVideoX().to(dtype).eval()
    transformer = build_transformer(name, device, dtype)
    sizes = {
        part: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
        for part, m in (("text_encoder", text_encoder), ("transformer", transformer), ("vae", vae))
    }
    print(f"{name}: weights (GB): " + ", ".join(f"{k} {v / GB:.2f}" for k, v in sizes.items()), flush=True)
    rows = []
    tokens = torch.zeros(2, 226, dtype=torch.long, device=device)
    encode = added_peak(text_encoder, tokens)
    config = transformer.config
    for frames, height, width in SHAPES[name]:
        latent_frames, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
        latents = torch.randn(2, latent_frames, config.in_channels, h, w, device=device, dtype=dtype)
        text = torch.randn(2, 226, config.text_embed_dim, device=device, dtype=dtype)
        rotary = None
        if config.use_rotary_positional_embeddings:
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

            holder = type("P", (), {"transformer": transformer, "vae_scale_factor_spatial": 8})()
            rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(
                holder, height, width, latent_frames, device
            )
        step = added_peak(
            transformer,
            hidden_states=latents,
            encoder_hidden_states=text,
            timestep=torch.tensor([500, 500], device=device),
            image_rotary_emb=rotary,
            return_dict=False,
        )
        z = torch.randn(1, 16, latent_frames, h, w, device=device, dtype=dtype)
        vae.disable_tiling(), vae.disable_slicing()
        untiled = added_peak(vae.decode, z)
        vae.enable_tiling(), vae.enable_slicing()
        tiled = added_peak(vae.decode, z)
        row = {
            "shape": f"{frames}x{height}x{width}",
            "tokens": latent_frames * (h // 2) * (w // 2),
            "encode GB": encode / GB,
            "step GB": step / GB,
            "decode GB": untiled / GB,
            "decode tiled GB": tiled / GB,
        }
        print(
            f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
            flush=True,
        )
        rows.append(row)
    return rows


PROMPTS = ("a paper boat floats down a stream", "neon lights flicker in the rain")


def finished_job(fields: dict, info):
    """A Job checked, expanded and resolved as submit does."""
    from common.job_spec import check_job, expand_job
    from common.resolver import AdapterResolver, resolve_job
    from common.settings import Settings

    settings = Settings()
    spec, errors = check_job(fields, "benchmark", info, settings.max_video_pixels)
    assert not errors, errors
    ((scale, seed),) = expand_job(spec)
    return resolve_job(spec, scale, seed, info, AdapterResolver.from_settings(settings, None))


def one_lorafleet(args, paths: dict) -> dict:
    """Two jobs on a worker's Renderer under the budget: a short warm-up (adapter a1, first prompt),
    then the measured one (adapter a2, a new prompt: a variant switch and a T5 pass)."""
    import tempfile

    from common.settings import Settings
    from workers.memory import GB as PLAN_GB
    from workers.renderer import Renderer

    settings = Settings(gpu_memory_gb=args.budget, adapter_cache_dir=tempfile.mkdtemp())
    renderer = Renderer(paths["model"], "cuda", settings, "bench")
    size = (renderer.info.num_frames, renderer.info.height, renderer.info.width)
    jobs = [
        {"prompt": PROMPTS[0], "seed": 1, "adapters": [paths["a1"]], "steps": 2},
        {"prompt": PROMPTS[1], "seed": 2, "adapters": [paths["a2"]], "steps": args.steps},
    ]
    peaks = {}

    def at_step(step: int, steps: int) -> None:
        if step == steps:
            peaks["denoise"] = torch.cuda.max_memory_allocated()

    for fields in jobs:
        started = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        frames, timings = renderer.render(finished_job(fields, renderer.info), at_step)
        seconds = time.perf_counter() - started
    print(f"measured job's timings (s): {json.dumps({k: round(v, 3) for k, v in timings.items()})}", flush=True)
    return {
        "phase peaks GB": f"{peaks['denoise'] / PLAN_GB:.1f} / {torch.cuda.max_memory_allocated() / PLAN_GB:.1f}",
        "plan": renderer.plan.name,
        "estimated peak GB": renderer.footprint.peak(renderer.plan, *size) / PLAN_GB,
        "load s": renderer.load_seconds,
        "s per job": seconds,
    }


def one_diffusers(args, paths: dict, offload: bool) -> dict:
    """diffusers' own pipeline, the same two jobs, each adapter loaded and fused as its docs show;
    with `offload`: model CPU offload and VAE tiling and slicing, as CogVideo advises for small cards."""
    from diffusers import CogVideoXPipeline

    started = time.perf_counter()
    pipe = CogVideoXPipeline.from_pretrained(paths["model"], torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    if offload:
        pipe.enable_model_cpu_offload()
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    else:
        pipe.to("cuda")
    load = time.perf_counter() - started
    for prompt, seed, adapter, steps in ((PROMPTS[0], 1, "a1", 2), (PROMPTS[1], 2, "a2", args.steps)):
        started = time.perf_counter()
        pipe.unload_lora_weights()
        pipe.load_lora_weights(paths[adapter])
        pipe.fuse_lora()
        pipe(
            prompt=prompt,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )
        seconds = time.perf_counter() - started
    plan = "diffusers model offload + VAE tiling" if offload else "diffusers, all on the GPU"
    return {"plan": plan, "estimated peak GB": None, "load s": load, "s per job": seconds}


def run_one(args) -> None:
    """One arrangement in this process, under a per-process memory limit that emulates the card."""
    total = torch.cuda.get_device_properties(0).total_memory
    if args.budget * GB < total:
        torch.cuda.set_per_process_memory_fraction(args.budget * GB / total)
    from benchmarks.full_size import pipeline_paths

    paths = pipeline_paths(args.folder)
    if args.one == "lorafleet":
        row = one_lorafleet(args, paths)
    else:
        row = one_diffusers(args, paths, offload=args.one == "diffusers-offload")
    row |= {
        "peak allocated GB": torch.cuda.max_memory_allocated() / GB,
        "peak reserved GB": torch.cuda.max_memory_reserved() / GB,
    }
    print("RESULT " + json.dumps(row), flush=True)


def tier_table(args) -> int:
    """Every budget's lorafleet worker and diffusers' offload pipeline, each in a process of its own."""
    from benchmarks.full_size import ensure_pipeline

    ensure_pipeline(args.folder, args.model)
    runs = [("lorafleet", budget) for budget in args.budgets]
    runs += [("diffusers-offload", args.budgets[-1]), *(("diffusers", args.budgets[0]),) * args.diffusers_resident]
    rows = []
    for what, budget in runs:
        command = [sys.executable, __file__, "--one", what, "--budget", str(budget), "--folder", args.folder]
        # Memory handed back to the allocator is reusable at any size: reserved stays near allocated.
        env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        done = subprocess.run([*command, "--steps", str(args.steps)], capture_output=True, text=True, env=env)
        print("".join(line + "\n" for line in done.stdout.splitlines() if line.startswith("measured")), end="")
        result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not result:
            print(f"{what} at {budget} GB failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}", flush=True)
            rows.append({"budget GB": budget, "plan": f"{what}: failed"})
            continue
        rows.append({"budget GB": budget, **json.loads(result[-1].removeprefix("RESULT "))})
        print(json.dumps(rows[-1]), flush=True)
    resident = next((r["s per job"] for r in rows if r.get("plan") == "resident"), None)
    for row in rows:
        row["ratio to resident"] = row["s per job"] / resident if resident and "s per job" in row else None
    columns = ["budget GB", "plan", "estimated peak GB", "peak allocated GB", "peak reserved GB", "phase peaks GB"]
    columns += ["s per job"]
    columns += ["ratio to resident", "load s"]
    print(
        f"\n{torch.cuda.get_device_name(0)}, {args.model}, 49x480x720, {args.steps} steps, bf16; torch {torch.__version__}"
    )
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return 0 if all("s per job" in row for row in rows) else 1


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="print the planner's measurements instead")
    parser.add_argument("--models", nargs="+", default=["2b", "5b"], help="with --calibrate")
    parser.add_argument("--model", default="5b", choices=["2b", "5b"])
    parser.add_argument(
        "--budgets", nargs="+", type=float, default=[79, 47, 23], help="GB torch may use, largest first"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--folder", default="/tmp/lorafleet-memory-tiers", help="the pipeline folder (written if absent)"
    )
    parser.add_argument("--diffusers-resident", action="store_true", help="also diffusers' pipeline all on the GPU")
    parser.add_argument("--one", choices=["lorafleet", "diffusers", "diffusers-offload"], help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calibrate:
        for name in args.models:
            calibrate(name)
            torch.cuda.empty_cache()
        return 0
    if args.one:
        run_one(args)
        return 0
    return tier_table(args)


if __name__ == "__main__":
    sys.exit(main())
