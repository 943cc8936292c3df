"""Render speed per tier: diffusers' eager pipeline against lorafleet's bf16 and fp8 tiers, compiled
or not, on one GPU, in one run.

    python benchmarks/render_speed.py --model 5b --steps 50 \\
        --runs diffusers bf16 bf16-compiled:cold bf16-compiled fp8-compiled:cold fp8-compiled

A full-size random-weight pipeline is written to --folder if absent (benchmarks/full_size.py). Each
run is a process of its own, started as a fresh worker would be (an empty local inductor cache), and
renders two jobs of the model's default size: the first job (adapter a1, a prompt), then the measured
one (adapter a2, a new prompt: a variant switch and a T5 pass, as a fleet's next job). Runs:

  diffusers          diffusers' own CogVideoXPipeline, eager, each adapter loaded and fused as its
                     docs show
  TIER[-compiled[-whole]][-fa4][-HOOK]
                     lorafleet's Renderer in TIER (bf16 or fp8); compiled at start (by blocks, the
                     default, or `-whole`: LORAFLEET_COMPILE_SCOPE); `-fa4`: with FlashAttention-4 as
                     its attention kernel (workers/attention.py); `-HOOK` (taylorseer, fastercache,
                     pab, first-block): a draft tier with that cache hook at lorafleet's defaults
                     (workers/draft.py), each `+NAME=VALUE` after it setting one of the hook's
                     parameters (`fp8-compiled-fa4-taylorseer+factors_bits=16`); with the compile
                     artifacts in --store (shared by the runs before it); `:cold` with an empty
                     store (what it compiles is then copied into --store)

It prints, per run: start to ready (imports, load, compile: a worker's READY), the first job, the
measured job and its seconds per denoising step, the ratio to diffusers, the variant switch (in the
measured job, where a2's factors go to the device for the first time, as the job's own timing has
it; built from factors already there, a1 at another scale, synchronised; from the variant cache),
whether the weights came back bit for bit after the switches, graphs compiled after the first job,
the transformer's output error against diffusers' bf16 on the same inputs, the measured job's frames
against diffusers' frames of the same job (PSNR, peak 1; a draft's loss is its row's drop from its
exact tier's), and the peak GPU memory. `--first-steps` shortens
the first job (it only warms up). Results: benchmarks/README.md.
"""

import argparse
import faulthandler
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.memory_tiers import PROMPTS, finished_job  # noqa: E402

GB = 1e9


class Steps:
    """Per-step wall times from a pipeline's step callback (synchronised: the GPU's time)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, *_) -> dict:  # a diffusers step callback, or a renderer's progress callback
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return {}

    def per_step(self) -> float | None:
        """The median time between steps; None for a job of one step (a `--first-steps 1` job)."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return statistics.median(gaps) if gaps else None


def probe(pipe, size: tuple[int, int, int]) -> torch.Tensor:
    """The transformer's output for fixed random inputs of a CFG step at `size` (on the host)."""
    frames, height, width = size
    config = pipe.transformer.config
    generator = torch.Generator("cpu").manual_seed(7)
    latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    shape = (2, latent_frames, config.in_channels, height // 8, width // 8)
    latents = torch.randn(shape, generator=generator).to("cuda", torch.bfloat16)
    text = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=generator)
    rotary = None
    if config.use_rotary_positional_embeddings:
        rotary = pipe._prepare_rotary_positional_embeddings(height, width, latent_frames, torch.device("cuda"))
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=latents,
            encoder_hidden_states=text.to("cuda", torch.bfloat16),
            timestep=torch.full((2,), 500, device="cuda"),
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
    return out.float().cpu()


def run_diffusers(args, paths: dict) -> dict:
    """diffusers' own pipeline, eager: its output on the probe, then the two jobs."""
    from diffusers import CogVideoXPipeline

    from common.model import model_info

    info = model_info(paths["model"])
    pipe = CogVideoXPipeline.from_pretrained(paths["model"], torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    ready = time.time() - args.started
    size = (info.num_frames, info.height, info.width)
    save_file(
        {"output": probe(pipe, size)}, os.path.join(args.store, "probe-diffusers.safetensors")
    )  # the exact bf16 base
    row = {"start to ready s": ready}
    for n, (prompt, adapter) in enumerate(((PROMPTS[0], "a1"), (PROMPTS[1], "a2"))):
        started, steps = time.perf_counter(), Steps()
        pipe.unload_lora_weights()
        pipe.load_lora_weights(paths[adapter])
        pipe.fuse_lora()
        frames = pipe(
            prompt=prompt,
            num_inference_steps=args.first_steps if n == 0 else args.steps,
            generator=torch.Generator("cpu").manual_seed(n),
            output_type="np",
            callback_on_step_end=steps,
        ).frames[0]
        torch.cuda.synchronize()
        row["first job s" if n == 0 else "job s"] = time.perf_counter() - started
        row["s per step"] = steps.per_step()
    save_frames(frames, args.store, "frames-diffusers.npy")
    return row


def save_frames(frames, folder: str, name: str) -> None:
    """The measured job's frames as 8-bit, for the table's PSNR against diffusers'."""
    numpy.save(os.path.join(folder, name), (numpy.asarray(frames) * 255).round().clip(0, 255).astype(numpy.uint8))


def frames_psnr(got: str, expected: str) -> float:
    """PSNR in dB (peak 1) of two runs' 8-bit frames."""
    a, b = (numpy.load(path).astype(numpy.float64) / 255 for path in (got, expected))
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def run_lorafleet(
    args, paths: dict, precision: str, compiled: bool, scope: str, attention: str = "sdpa", hook: str | None = None,
    params: dict | None = None,
) -> dict:
    """A worker's Renderer in one tier: the two jobs, the switches back, then its output on the probe."""
    from common.settings import DraftCache, Settings
    from workers.fp8 import is_fp8
    from workers.renderer import Renderer, compiled_graphs

    settings = Settings(
        adapter_cache_dir=tempfile.mkdtemp(),
        store_url=args.store,
        variant_cache_size=2,
        compile_scope=scope,
        compile_cache_secret="render-speed",  # the runs share signed artifacts, as a fleet with its secret does
    )
    cache = DraftCache(hook=hook, params=params or {}) if hook else None
    renderer = Renderer(paths["model"], "cuda", settings, "bench", precision, compiled, attention, cache)
    info = renderer.info
    row = {"start to ready s": time.time() - args.started, "compile s": renderer.compile_seconds}
    layers = sorted(renderer.variants.linears)

    def weights() -> list[torch.Tensor]:
        """Every linear layer's stored weights, copied to the host (not to count in the peak)."""
        found = []
        for name in layers:
            weight = renderer.variants.linears[name].weight
            found += [weight.qdata.view(torch.uint8), weight.scale] if is_fp8(weight) else [weight.detach()]
        return [tensor.to("cpu", copy=True) for tensor in found]

    base = weights()
    graphs = None
    for n, (prompt, adapter) in enumerate(((PROMPTS[0], "a1"), (PROMPTS[1], "a2"))):
        job_steps = args.first_steps if n == 0 else args.steps
        job = finished_job({"prompt": prompt, "seed": n, "adapters": [paths[adapter]], "steps": job_steps}, info)
        started, steps = time.perf_counter(), Steps()
        frames, timings = renderer.render(job, steps)
        torch.cuda.synchronize()
        row["first job s" if n == 0 else "job s"] = time.perf_counter() - started
        row["s per step"] = steps.per_step()
        row["first-use switch ms"] = timings["variant"] * 1e3
        if n == 0:
            row["first job timings"] = {k: round(v, 2) for k, v in timings.items()}
            first_variant = weights()
            graphs = compiled_graphs() if compiled else None
    save_frames(frames, args.store, "frames.npy")
    # Back to a1 from the variant cache, then to the base: both must come back bit for bit.
    terms, variant = renderer._terms(finished_job({"prompt": "x", "adapters": [paths["a1"]]}, info))
    torch.cuda.synchronize()
    started = time.perf_counter()
    renderer.variants.apply(terms, 1.0, variant)
    torch.cuda.synchronize()
    row["cached switch ms"] = (time.perf_counter() - started) * 1e3
    same = all(torch.equal(a, b) for a, b in zip(weights(), first_variant, strict=True))
    # a1 at another scale: its factors already on the device, the variant new (a sweep's next point)
    torch.cuda.synchronize()
    started = time.perf_counter()
    renderer.variants.apply(terms, 0.5, (variant[0], 0.5))
    torch.cuda.synchronize()
    row["built switch ms"] = (time.perf_counter() - started) * 1e3
    renderer.variants.apply([], 1.0, ())
    same = same and all(torch.equal(a, b) for a, b in zip(weights(), base, strict=True))
    row["exact after switches"] = same
    row["graphs after first job"] = compiled_graphs() - graphs if compiled else None
    if cache is None:  # a draft's hooks run only inside a pipeline call (its first step is exact anyway)
        with torch.compiler.set_stance("eager_on_recompile"):  # as a job runs it: never a compile for the probe
            output = probe(renderer.pipe, (info.num_frames, info.height, info.width))
        save_file({"output": output}, os.path.join(args.store, "probe.safetensors"))
    return row


def run_one(args) -> None:
    """One run in this process; prints its row as a RESULT line."""
    # A run that outstays its time shows where it was.
    faulthandler.dump_traceback_later(max(args.run_timeout - 5, 1), exit=True)
    from benchmarks.full_size import pipeline_paths

    paths = pipeline_paths(args.folder)
    name, *given = args.one.removesuffix(":cold").split("+")
    if name == "diffusers":
        row = run_diffusers(args, paths)
    else:
        from common.settings import CACHE_PARAMS

        hook = next((hook for hook in CACHE_PARAMS if name.endswith("-" + hook)), None)
        tier = name.removesuffix("-" + hook if hook else "").split("-")
        scope, attention = "whole" if "whole" in tier else "blocks", "fa4" if "fa4" in tier else "sdpa"
        params = {key: float(value) for key, value in (p.split("=") for p in given)}
        row = run_lorafleet(args, paths, tier[0], "compiled" in tier, scope, attention, hook, params)
    row["peak GB"] = torch.cuda.max_memory_allocated() / GB
    print("RESULT " + json.dumps(row), flush=True)


def table(args) -> int:
    """Every run in a process of its own, then the table; exits 1 if a run failed."""
    from benchmarks.full_size import ensure_pipeline
    from common.settings import CACHE_PARAMS

    ensure_pipeline(args.folder, args.model)
    os.makedirs(args.store, exist_ok=True)
    rows = []
    for run in args.runs:
        store = tempfile.mkdtemp() if run.endswith(":cold") else args.store  # :cold shares nothing
        command = [sys.executable, __file__, "--one", run, "--folder", args.folder, "--store", store]
        command += ["--steps", str(args.steps), "--first-steps", str(args.first_steps)]
        command += ["--run-timeout", str(args.run_timeout), "--started", str(time.time())]
        for output in ("probe.safetensors", "frames.npy"):  # an earlier run's outputs are not this one's
            if os.path.exists(os.path.join(store, output)):
                os.remove(os.path.join(store, output))
        # A fresh worker: no inductor cache on this machine, only what the store shares.
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(), "PYTHONUNBUFFERED": "1"}
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.run_timeout)
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            print(f"{run} ran past {args.run_timeout}s:\n{stderr[-6000:]}", flush=True)
            rows.append({"run": run})
            continue
        result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not result:
            print(f"{run} failed:\n{done.stdout[-3000:]}{done.stderr[-5000:]}", flush=True)
            rows.append({"run": run})
            continue
        row = {"run": run, **json.loads(result[-1].removeprefix("RESULT "))}
        reference = os.path.join(args.store, "probe-diffusers.safetensors")
        output = os.path.join(store, "probe.safetensors")
        if run != "diffusers" and os.path.exists(reference) and os.path.exists(output):
            expected, got = load_file(reference)["output"], load_file(output)["output"]
            row["output rel. error"] = float((got - expected).norm() / expected.norm())
        frames, diffusers_frames = os.path.join(store, "frames.npy"), os.path.join(args.store, "frames-diffusers.npy")
        if run != "diffusers" and os.path.exists(frames) and os.path.exists(diffusers_frames):
            row["frames PSNR dB"] = frames_psnr(frames, diffusers_frames)
        name = run.removesuffix(":cold")
        if run != "diffusers" and os.path.exists(frames):
            shutil.copy(frames, os.path.join(args.store, f"frames-{name}.npy"))
        tier = name.split("+")[0]  # a draft's parameters follow its hook
        exact = next((tier.removesuffix("-" + hook) for hook in CACHE_PARAMS if tier.endswith("-" + hook)), None)
        if exact and os.path.exists(os.path.join(args.store, f"frames-{exact}.npy")):  # a draft against its exact tier
            row["PSNR vs exact tier dB"] = frames_psnr(frames, os.path.join(args.store, f"frames-{exact}.npy"))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if store != args.store:  # what a cold run compiled serves the runs (and benchmark calls) after it
            shutil.copytree(
                os.path.join(store, "compile-cache"), os.path.join(args.store, "compile-cache"), dirs_exist_ok=True
            )
    baseline = next((r for r in rows if r["run"] == "diffusers" and "job s" in r), None)
    for row in rows:
        if baseline and "job s" in row:
            row["ratio to diffusers"] = row["job s"] / baseline["job s"]
    columns = ["run", "start to ready s", "compile s", "first job s", "job s", "s per step", "ratio to diffusers"]
    columns += ["first-use switch ms", "built switch ms", "cached switch ms"]
    columns += ["exact after switches", "graphs after first job"]
    columns += ["output rel. error", "frames PSNR dB", "PSNR vs exact tier dB", "peak GB"]
    print(
        f"\n{torch.cuda.get_device_name(0)}, {args.model}, default size, {args.steps} steps; torch {torch.__version__}"
    )
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |", flush=True)
    return 0 if all("job s" in row for row in rows) else 1


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="5b", choices=["2b", "5b"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--first-steps", type=int, help="the first (warm-up) job's steps; default: --steps")
    parser.add_argument("--runs", nargs="+", default=["diffusers", "bf16", "bf16-compiled", "fp8-compiled"])
    parser.add_argument(
        "--folder", default="/tmp/lorafleet-render-speed", help="the pipeline folder (written if absent)"
    )
    parser.add_argument(
        "--store", default="/tmp/lorafleet-render-speed-store", help="where compile artifacts are shared"
    )
    parser.add_argument("--run-timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.first_steps = args.first_steps or args.steps
    if args.one:
        run_one(args)
        return 0
    return table(args)


if __name__ == "__main__":
    sys.exit(main())
