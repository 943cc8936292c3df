"""Adapter switching: diffusers' LoRA path against lorafleet's variant engine, side by side.

    python benchmarks/variant_switch.py --models tiny                 # CPU, fp32, the tiny model
    python benchmarks/variant_switch.py --models 2b 5b --device cuda  # full-size random weights, bf16

For each model, two random rank-R adapters on every block's attention (to_q, to_k, to_v, to_out.0)
are written to local disk in diffusers' format. Measured, for each path:
  cold load     one adapter from local disk until it is ready to fuse on the device
  switch        between two cached two-adapter combinations (mean over --switch-reps)
  scale sweep   five lora_scale values of one combination, all five switches
  drift         max |W - W0| over the targeted weights after --drift-switches switches and back
  recompiles    graphs torch.compile makes after the first, over three switches (with --compile)
  cache memory  device memory the path holds beyond the model (pristine copies, adapter factors)
and the floor: bytes of the targeted weights over the measured device copy bandwidth.
Random weights time exactly like trained ones; the table says what machine it ran on.
"""

import argparse
import gc
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import CogVideoXPipeline  # noqa: E402

from benchmarks.full_size import CONFIGS, TARGETS, write_adapters  # noqa: E402
from benchmarks.full_size import build_transformer as build  # noqa: E402
from common.adapters import read_adapter_url  # noqa: E402
from common.reading import ReadPolicy  # noqa: E402
from common.settings import Settings  # noqa: E402
from workers.adapter_cache import AdapterCache, AdapterFiles
from workers.variants import VariantEngine  # noqa: E402

COMBO_X = [("a1", 1.0), ("a2", 0.5)]
COMBO_Y = [("a1", 0.7), ("a2", 1.0)]
SWEEP = [0.0, 0.25, 0.5, 0.75, 1.0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def targeted(model) -> dict[str, torch.Tensor]:
    return {
        f"transformer_blocks.{i}.attn1.{t}": model.get_submodule(f"transformer_blocks.{i}.attn1.{t}").weight
        for i, _ in enumerate(model.transformer_blocks)
        for t in TARGETS
    }


def max_drift(model, pristine: dict[str, torch.Tensor]) -> float:
    now = targeted(model)
    return max((now[k].float() - v.float()).abs().max().item() for k, v in pristine.items())


def forward_once(model, device, dtype):
    config = model.config
    frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
    latents = torch.randn(
        1, frames, config.in_channels, config.sample_height, config.sample_width, device=device, dtype=dtype
    )
    text = torch.randn(1, config.max_text_seq_length, config.text_embed_dim, device=device, dtype=dtype)
    rotary = None
    if config.use_rotary_positional_embeddings:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_3d_rotary_pos_embed

        patch = config.patch_size
        rotary = get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim, crops_coords=((0, 0), (config.sample_height // patch, config.sample_width // patch)),
            grid_size=(config.sample_height // patch, config.sample_width // patch), temporal_size=frames, device=device,
        )  # fmt: skip
    with torch.no_grad():
        model(
            hidden_states=latents,
            encoder_hidden_states=text,
            timestep=torch.tensor([500], device=device),
            image_rotary_emb=rotary,
        )


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure_switching(switch, device, args, drift_scales) -> dict:
    """Time switches between the two cached combinations and a five-point sweep, then switch
    --drift-switches more times (for the drift that the caller measures)."""
    switch(COMBO_X)
    switch(COMBO_Y)
    reps = args.switch_reps
    total = timed(device, lambda: [switch(COMBO_Y if i % 2 == 0 else COMBO_X) for i in range(reps)])
    sweep = timed(device, lambda: [switch(COMBO_X, s) for s in SWEEP])
    for i in range(args.drift_switches):
        switch(COMBO_Y if i % 2 == 0 else COMBO_X, drift_scales[i % len(drift_scales)])
    return {"switch (ms)": total / reps * 1e3, "scale sweep, 5 points (ms)": sweep * 1e3}


def bench_diffusers(model, paths, device, args) -> dict:
    pristine = {k: v.detach().clone() for k, v in targeted(model).items()}
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    out = {"cold load (s)": timed(device, lambda: pipe.load_lora_weights(paths["a1"], adapter_name="a1"))}
    pipe.load_lora_weights(paths["a2"], adapter_name="a2")
    out["cache memory (MB)"] = ((torch.cuda.memory_allocated() if device.type == "cuda" else 0) - before) / 2**20

    def switch(combo, scale=1.0):
        pipe.unfuse_lora()
        pipe.set_adapters([n for n, _ in combo], [w for _, w in combo])
        pipe.fuse_lora(lora_scale=scale)

    # fuse_lora at a scale other than 1 is not undone by unfuse_lora: drift is measured at scale 1.
    out.update(measure_switching(switch, device, args, drift_scales=(1.0,)))
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    out["drift after N switches (max abs)"] = max_drift(model, pristine)
    if args.compile:
        model.compile(backend=args.compile_backend)
        forward_once(model, device, args.dtype)
        graphs = compiled_graphs()
        for combo in (COMBO_X, COMBO_Y, COMBO_X):
            pipe.load_lora_weights(paths["a1"], adapter_name="a1")
            pipe.load_lora_weights(paths["a2"], adapter_name="a2")
            switch(combo)
            forward_once(model, device, args.dtype)
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
        out["recompiles after the first compile"] = compiled_graphs() - graphs
    return out


def bench_lorafleet(model, paths, device, args, variant_cache: int = 0, pristine_on_host: bool = False) -> dict:
    pristine = {k: v.detach().clone() for k, v in targeted(model).items()}
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    engine = VariantEngine(
        model, device_cache_bytes=2**34, variant_cache_size=variant_cache, pristine_on_host=pristine_on_host
    )
    with tempfile.TemporaryDirectory() as cache_dir:
        policy = ReadPolicy.from_settings(Settings())
        adapters = AdapterCache(AdapterFiles(cache_dir, 2**34, policy), 2**34, engine.layer_sizes())
        url = {n: os.path.join(p, "pytorch_lora_weights.safetensors") for n, p in paths.items()}
        sha = {n: read_adapter_url(u, policy)[0].sha256 for n, u in url.items()}

        def cold():  # an adapter's first use on a worker: read, checked, factors to the device, fused
            engine.apply([(adapters.get(url["a1"], sha["a1"]), 1.0, None)], 1.0, ("cold",))

        out = {"cold load (s)": timed(device, cold)}
        engine.apply([], 0.0, ())
        loaded = {n: adapters.get(url[n], sha[n]) for n in ("a1", "a2")}

    def switch(combo, scale=1.0):
        terms = [(loaded[n], w, None) for n, w in combo]
        engine.apply(terms, scale, (tuple((n, w) for n, w in combo), scale))

    out.update(measure_switching(switch, device, args, drift_scales=(0.5, 1.0, 1.7)))
    engine.apply([], 1.0, ())
    out["drift after N switches (max abs)"] = max_drift(model, pristine)
    out["cache memory (MB)"] = ((torch.cuda.memory_allocated() if device.type == "cuda" else 0) - before) / 2**20
    if device.type != "cuda":
        variants = sum(
            stack.nbytes for fused in (engine.variants.items.values() if engine.variants else []) for _, stack in fused
        )
        out["cache memory (MB)"] = (
            sum(t.nbytes for t in engine.groups.values()) + engine.factors.nbytes + variants
        ) / 2**20
    if args.compile:
        model.compile(backend=args.compile_backend)
        forward_once(model, device, args.dtype)
        graphs = compiled_graphs()
        for combo in (COMBO_X, COMBO_Y, COMBO_X):
            switch(combo, 0.8)
            forward_once(model, device, args.dtype)
        out["recompiles after the first compile"] = compiled_graphs() - graphs
    return out


def floor_ms(model, device) -> tuple[float, float]:
    weights = list(targeted(model).values())
    copies = [w.detach().clone() for w in weights]
    nbytes = sum(w.nbytes for w in weights)

    def copy_all():
        for w, c in zip(weights, copies, strict=True):
            w.copy_(c)

    copy_all()
    seconds = min(timed(device, copy_all) for _ in range(5))
    bandwidth = 2 * nbytes / seconds  # read + write
    return nbytes / 2**20, 2 * nbytes / bandwidth * 1e3


PATHS = {
    "diffusers": bench_diffusers,
    "lorafleet": bench_lorafleet,
    "lorafleet K=2": lambda *a: bench_lorafleet(*a, variant_cache=2),  # two whole fused variants kept
    "lorafleet host": lambda *a: bench_lorafleet(*a, pristine_on_host=True),  # LORAFLEET_PRISTINE_ON_HOST
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=list(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--switch-reps", type=int, default=50)
    parser.add_argument("--drift-switches", type=int, default=1000)
    parser.add_argument(
        "--variant-cache", type=int, default=0, help="lorafleet: whole fused variants kept on the device"
    )
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="the columns, per model")
    parser.add_argument("--compile", action="store_true", help="also count recompiles under torch.compile")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="recompiles are decided by dynamo's guards, the same for any backend",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    rows: dict[str, dict[str, float]] = {}
    columns = []
    for name in args.models:
        model = build(name, device, args.dtype)
        with tempfile.TemporaryDirectory() as folder:
            paths = write_adapters(model, args.rank if name != "tiny" else 4, folder, args.dtype)
            targeted_mb, floor = floor_ms(model, device)
            results = {}
            for path in args.paths:
                bench = PATHS[path]
                torch._dynamo.reset()
                fresh = build(name, device, args.dtype)
                results[path] = bench(fresh, paths, device, args)
                del fresh
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"[{name}] {path}: {results[path]}", file=sys.stderr, flush=True)
        del model
        gc.collect()
        for path, values in results.items():
            column = f"{name} {path}"
            columns.append(column)
            for metric, value in values.items():
                rows.setdefault(metric, {})[column] = value
            rows.setdefault("floor: targeted weights / copy bandwidth (ms)", {})[column] = floor
            rows.setdefault("targeted weights (MB)", {})[column] = targeted_mb

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    import diffusers

    print(f"\nvariant switching on {where}, {str(args.dtype).removeprefix('torch.')}, rank {args.rank} (tiny: 4), "
          f"drift over {args.drift_switches} switches; torch {torch.__version__}, diffusers {diffusers.__version__}\n")  # fmt: skip
    width = max(len(m) for m in rows) + 2
    cell = max(16, *(len(c) for c in columns))
    print("| " + "metric".ljust(width) + " | " + " | ".join(c.rjust(cell) for c in columns) + " |")
    print("|" + "-" * (width + 2) + "|" + "|".join("-" * (cell + 2) for _ in columns) + "|")
    # lorafleet K=2 keeps two whole fused variants on the device: a switch between them is one copy.
    for metric, values in rows.items():
        cells = []
        for column in columns:
            value = values.get(column)
            cells.append(
                ("—" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)).rjust(cell)
            )
        print("| " + metric.ljust(width) + " | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
