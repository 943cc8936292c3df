"""Rendering a job on the warm pipeline, and writing its video, poster and metadata to the store."""

import contextlib
import io
import json
import logging
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video
from PIL import Image

import common
from common.adapters import ReadPolicy
from common.errors import MemoryBudgetError, RenderError
from common.images import decoded_bytes, read_image_url
from common.job import adapter_combination
from common.model import ModelInfo, model_info
from common.settings import Settings
from common.store import Store, output_uris, video_exists, video_path
from workers.compile_cache import CompileCache, identity
from workers.fp8 import SavedWeights, check_fp8_device, quantize_transformer
from workers.memory import (
    GB,
    PLANS,
    Footprint,
    choose,
    fit_problem,
    memory_budget,
    offload_text_encoder,
    with_settings,
)
from workers.metrics import observe_render
from workers.variants import LRU, AdapterCache, AdapterFiles, Term, VariantEngine

IMAGE_CACHE_BYTES = 512 * 2**20
log = logging.getLogger("lorafleet.render")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Progress = Callable[[int, int], None]


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The weights dtype: `auto` is bf16 on a GPU and fp32 on the CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[setting]


class Renderer:
    """One warm pipeline on one device: builds each job's variant, renders it, writes the outputs."""

    def __init__(
        self,
        model_ref: str,
        device: str,
        settings: Settings,
        worker: str,
        precision: str = "bf16",
        compiled: bool | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        self.worker = worker
        self.precision = precision
        if precision == "fp8":
            check_fp8_device(self.device)
        self.info: ModelInfo = model_info(model_ref, precision)
        started = time.perf_counter()
        self.budget = memory_budget(settings.gpu_memory_gb, self.device)  # before loading: the card's free memory
        # Loaded on the host, weighed, then placed on the device as the memory plan says.
        self.pipe = DiffusionPipeline.from_pretrained(model_ref, dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.footprint = Footprint.of(self.pipe, settings.adapter_device_cache_mb * 2**20)
        default_size = (self.info.num_frames, self.info.height, self.info.width)
        try:
            plan = choose(self.footprint, self.budget, default_size, settings.memory_plan)
        except ValueError as exc:
            raise MemoryBudgetError(f"{exc} (LORAFLEET_GPU_MEMORY_GB)") from None
        self.plan = with_settings(plan, settings.vae_tiling, settings.pristine_on_host)
        if self.budget is not None and self.footprint.peak(self.plan, *default_size) > self.budget:
            log.warning("%s: memory plan %s was asked for, but its estimate exceeds the budget", worker, self.plan.name)
        originals = None
        if precision == "fp8":
            if self.plan.model_offload:
                raise MemoryBudgetError("precision fp8 needs the transformer on the GPU: model-offload cannot serve it")
            # The bf16 weights from before quantization, which every variant is fused from, read
            # from the model's files when an adapter first touches them.
            linears = self.pipe.transformer.named_modules()
            names = [name for name, m in linears if isinstance(m, torch.nn.Linear)]
            originals = SavedWeights(self.info.ref, names, self.dtype)
        self._place()
        if precision == "fp8":
            quantize_transformer(self.pipe.transformer)
        self.prompts = PromptEmbeddings(self.pipe, self.info.max_text_tokens, settings.prompt_cache_size)
        self.variants = VariantEngine(
            self.pipe.transformer,
            settings.adapter_device_cache_mb * 2**20,
            settings.variant_cache_size,
            self.plan.pristine_on_host,
            device=self.device,
            originals=originals,
        )
        files = AdapterFiles(
            settings.adapter_cache_dir,
            settings.adapter_disk_cache_mb * 2**20,
            ReadPolicy.from_settings(settings),
            Store(settings.store_url),
        )
        self.adapters = AdapterCache(files, settings.adapter_host_cache_mb * 2**20, self.variants.layer_sizes())
        # decoded input images by content hash, by their bytes (an 8192² image is 200 MB): a sweep reuses its few
        self.images = LRU(IMAGE_CACHE_BYTES, size=decoded_bytes)
        self.compiled = settings.compile if compiled is None else compiled
        self.compile_seconds = None
        if self.compiled:
            self._compile(settings, default_size)
        self.load_seconds = time.perf_counter() - started
        self.rendered = 0
        budget = "no budget" if self.budget is None else f"a {self.budget / GB:.1f} GB budget"
        log.info(
            "%s: memory plan %s: estimated peak %.1f GB at %s of %s (resident would need %.1f GB)",
            worker, self.plan.describe(), self.footprint.peak(self.plan, *default_size) / GB,
            "×".join(map(str, default_size)), budget, self.footprint.peak(PLANS[0], *default_size) / GB,
        )  # fmt: skip
        self.last_switched = False  # whether the last render had to switch variants

    def _compile(self, settings: Settings, size: tuple[int, int, int]) -> None:
        """Compile the transformer now, for the model's default size, with the fleet's shared
        artifacts if the store has them (workers/compile_cache.py), and share them if it had not.

        Variants rewrite the weights in place, which never recompiles. A job of another size (or
        without guidance, a batch of one) would recompile while the queue waits: it runs
        uncompiled instead (`render` runs jobs under torch's "eager_on_recompile" stance)."""
        secret = settings.compile_cache_secret
        store = self.adapters.files.store if settings.compile_cache and secret else None  # the fleet's store
        if settings.compile_cache and not secret:
            log.info(
                "%s: compile cache: not shared (artifacts are code: set LORAFLEET_COMPILE_CACHE_SECRET, the same "
                "on every worker, to share signed ones through the store)", self.worker,
            )  # fmt: skip
        transformer, backend, scope = self.pipe.transformer, settings.compile_backend, settings.compile_scope
        described = identity(dict(transformer.config), self.precision, size, backend, scope, self.device)
        cache = CompileCache(store, described, secret.get_secret_value().encode() if secret else b"unshared")
        started = time.perf_counter()
        shared = cache.load()
        if scope == "blocks":
            # Regional compilation: the blocks are one class with one config, and their weights
            # are the graph's inputs, so they share a graph (two: the first block's input is a
            # strided view). A cold compile costs a block's, not the model's.
            for block in transformer.transformer_blocks:
                block.compile(backend=backend)
        else:
            transformer.compile(backend=backend)
        self._warm_up(size)
        self.compile_seconds = time.perf_counter() - started
        saved = 0 if shared else cache.save()
        how = "with the fleet's shared artifacts" if shared else f"from scratch, shared {saved / 2**20:.1f} MB"
        how = how if store is not None else "from scratch, not shared"
        log.info(
            "%s: compiled the transformer (%s) for %s in %.1fs (%s; compile cache %s); other sizes run uncompiled",
            self.worker, "by blocks" if scope == "blocks" else "whole", "×".join(map(str, size)),
            self.compile_seconds, how, cache.key[:12],
        )  # fmt: skip

    def _warm_up(self, size: tuple[int, int, int]) -> None:
        """Two denoising steps at the default size, as a job makes them (CFG batch of two, zero
        prompt embeddings), without a decode: whatever a job would compile is compiled now."""
        num_frames, height, width = size
        width_of_text = self.pipe.text_encoder.config.d_model
        embeds = torch.zeros(1, self.info.max_text_tokens, width_of_text, dtype=self.dtype, device=self.device)
        call = dict(
            prompt_embeds=embeds,
            negative_prompt_embeds=embeds,
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=2,
            guidance_scale=6.0,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
        )
        if self.info.takes_image:
            call["image"] = Image.new("RGB", (width, height))
        with torch.no_grad():
            self.pipe(**call)

    def _place(self) -> None:
        """Put the pipeline's components where the memory plan says (on the CPU there is nowhere else)."""
        pipe, plan = self.pipe, self.plan
        if plan.vae_tiling:
            pipe.vae.enable_tiling()
            pipe.vae.enable_slicing()
        if self.device.type != "cuda":
            pipe.to(self.device)
        elif plan.model_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.transformer.to(self.device)
            pipe.vae.to(self.device)
            if plan.text_encoder_offloaded:
                offload_text_encoder(pipe.text_encoder, self.device)
            else:
                pipe.text_encoder.to(self.device)

    def device_name(self) -> str:
        """The device in words, for the metadata."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({platform.processor() or platform.machine()})"

    def gpu_memory(self) -> dict | None:
        """Bytes torch holds on the GPU now and at most since the worker started; None on the CPU."""
        if self.device.type != "cuda":
            return None
        return {
            "allocated": torch.cuda.memory_allocated(self.device),
            "peak": torch.cuda.max_memory_allocated(self.device),
        }

    def _terms(self, job: dict) -> tuple[list[Term], tuple]:
        """The job's adapters as (adapter, weight, alpha) terms, and the variant's identity."""
        combination = adapter_combination(job)
        if not combination:  # the base model: no adapter to read
            return [], ()
        terms = [(self.adapters.get(a["url"], a["sha256"]), a["weight"], a["alpha"]) for a in job["adapters"]]
        return terms, (combination, float(job["lora_scale"]))

    def render(self, job: dict, progress: Progress | None = None) -> tuple[list, dict]:
        """The job's frames (a list of H×W×3 float arrays in [0, 1]) and its timings in seconds."""
        timings = {}
        started = time.perf_counter()
        tile = self._check_memory(job)
        terms, variant = self._terms(job)
        timings["adapters"] = time.perf_counter() - started
        fused = job["fuse"]
        self.last_switched = self.variants.apply(terms if fused else [], job["lora_scale"], variant if fused else ())
        timings["variant"] = time.perf_counter() - started - timings["adapters"]

        def on_step_end(pipe, step, timestep, tensors):
            if step + 1 == steps:
                timings["denoise"] = time.perf_counter() - denoise_started
                check_finite(tensors["latents"], "the latents")
            if progress is not None:
                progress(step + 1, steps)
            return tensors

        prompt_embeds, negative_prompt_embeds = self.prompts.get(job["prompt"], job["negative_prompt"])
        timings["prompt"] = time.perf_counter() - started - timings["adapters"] - timings["variant"]
        steps = job["steps"]
        denoise_started = time.perf_counter()
        call = dict(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_frames=job["num_frames"],
            height=job["height"],
            width=job["width"],
            num_inference_steps=steps,
            guidance_scale=job["guidance_scale"],
            use_dynamic_cfg=job["use_dynamic_cfg"],
            # Noise from a CPU generator is the same on every device (diffusers' advice).
            generator=torch.Generator("cpu").manual_seed(job["seed"]),
            output_type="np",
            callback_on_step_end=on_step_end,
        )
        if self.info.takes_image:
            call["image"] = self.input_image(job["image"])

        def run():
            if fused or not terms:
                return self.pipe(**call).frames[0]
            return self._render_unfused(terms, job["lora_scale"], call)

        try:
            with self._stance():
                frames = self._with_vae_tiling(run) if tile else run()
        except torch.OutOfMemoryError:  # the estimate fell short: one more try, in tiles
            log.warning("%s: out of GPU memory; retrying once with VAE tiling and slicing", self.worker)
            torch.cuda.empty_cache()
            try:
                with self._stance():
                    frames = self._with_vae_tiling(run)
            except torch.OutOfMemoryError:
                raise MemoryBudgetError(
                    "out of GPU memory, even with VAE tiling and slicing: ask for fewer frames or pixels"
                ) from None
        check_finite(torch.as_tensor(frames), "the decoded frames")
        finished = time.perf_counter()
        timings["decode"] = finished - denoise_started - timings["denoise"]
        timings["total"] = finished - started
        self.rendered += 1
        return list(frames), timings

    def _stance(self):
        """How a job runs the transformer: compiled at start for the default size, a job that
        would need another graph runs uncompiled rather than compiling while the queue waits."""
        return torch.compiler.set_stance("eager_on_recompile") if self.compiled else contextlib.nullcontext()

    def input_image(self, image: dict):
        """A job's input image (PIL, RGB), read once per content hash; the pipeline resizes it."""
        found = self.images.get(image["sha256"])
        if found is None:
            files = self.adapters.files  # images are read under the adapters' policy
            found = read_image_url(image["url"], image["sha256"], files.policy, files.store)
            self.images.put(image["sha256"], found)
        return found

    def _check_memory(self, job: dict) -> bool:
        """Fail a job that cannot fit the worker's memory budget before it renders, with the reason;
        returns whether it fits only with the VAE decoding in tiles (switched on for this job)."""
        size = (job["num_frames"], job["height"], job["width"])
        if fit_problem(self.footprint, self.plan, self.budget, size) is None:
            return False
        tiled = replace(self.plan, vae_tiling=True)
        if not self.plan.vae_tiling and fit_problem(self.footprint, tiled, self.budget, size) is None:
            return True
        raise MemoryBudgetError(fit_problem(self.footprint, self.plan, self.budget, size))

    def _with_vae_tiling(self, run):
        """`run()` with the VAE decoding in tiles and slices, then the VAE as the plan has it."""
        vae = self.pipe.vae
        tiled, sliced = vae.use_tiling, vae.use_slicing
        vae.enable_tiling()
        vae.enable_slicing()
        try:
            return run()
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if not sliced:
                vae.disable_slicing()
            if not tiled:
                vae.disable_tiling()

    def _render_unfused(self, terms: list[Term], lora_scale: float, call: dict):
        """Render through diffusers' own adapter layers (the weights stay at the exact base)."""
        names = [f"job_adapter_{i}" for i in range(len(terms))]
        try:
            for name, (adapter, weight, alpha) in zip(names, terms, strict=True):
                self.pipe.load_lora_weights(adapter.state_dict(weight, alpha), adapter_name=name)
            self.pipe.set_adapters(names, [1.0] * len(names))  # w·alpha/r is folded into each B
            return self.pipe(**call, attention_kwargs={"scale": lora_scale}).frames[0]
        finally:
            self.pipe.unload_lora_weights()

    def cache_stats(self) -> dict:
        """The caches' hits, misses and sizes, and variant switches, since the worker started."""
        stats = {
            "adapter_files": self.adapters.files.stats(),
            "adapter_host": self.adapters.lru.stats(),
            "prompt_embeddings": self.prompts.lru.stats(),
            **self.variants.stats(),
        }
        if self.compiled:
            stats["compiled_graphs"] = compiled_graphs()
        return stats


class PromptEmbeddings:
    """Prompt embeddings by (prompt, negative prompt), kept in host memory: a sweep's jobs share
    their prompts, so T5 runs once per prompt and worker (and may live off the GPU). The same
    `encode_prompt` call as the pipeline's own, so the frames are the same bit for bit."""

    def __init__(self, pipe, max_tokens: int, size: int):
        self.pipe = pipe
        self.max_tokens = max_tokens
        self.lru = LRU(size, size=lambda _: 1)

    def get(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (prompt, negative prompt) embeddings on the device the pipeline runs on."""
        device = self.pipe._execution_device
        found = self.lru.get((prompt, negative_prompt))
        if found is None:
            with torch.no_grad():
                found = tuple(
                    embeds.cpu()
                    for embeds in self.pipe.encode_prompt(
                        prompt, negative_prompt, True, 1, max_sequence_length=self.max_tokens, device=device
                    )
                )
            if self.lru.budget_bytes:
                self.lru.put((prompt, negative_prompt), found)
        return tuple(embeds.to(device) for embeds in found)


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Fail the job, rather than store a black video as done, when a render produced NaN or Inf."""
    if not torch.isfinite(tensor).all():
        raise RenderError(f"{what} came out NaN or infinite: not stored (check the adapters' weights and lora_scale)")


def compiled_graphs() -> int:
    """How many graphs torch.compile has made in this process: constant after the first render."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def encode_outputs(frames: list, fps: int) -> tuple[bytes, bytes]:
    """The frames as H.264 MP4 bytes and the first frame as PNG bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        export_to_video(frames, path, fps=fps)
        with open(path, "rb") as f:
            mp4 = f.read()
    poster = io.BytesIO()
    Image.fromarray((frames[0] * 255).round().clip(0, 255).astype("uint8")).save(poster, format="PNG")
    return mp4, poster.getvalue()


@dataclass
class Rendered:
    """A job's frames and metadata, rendered and not yet in the store."""

    job: dict
    frames: list
    timings: dict
    metadata: dict


def render_frames(renderer: Renderer, job: dict, progress: Progress | None = None) -> Rendered:
    """Render a finished job (adapters resolved, key set) and gather its metadata."""
    key = job["key"]
    started_at = time.time()
    frames, timings = renderer.render(job, progress)
    metadata = {
        "key": key,
        "job": job,
        "adapters": [
            {"uri": a["uri"], "sha256": a["sha256"], "weight": a["weight"], "alpha": a["alpha"]}
            for a in job["adapters"]
        ],
        "model": renderer.info.ref,
        "scheduler": renderer.info.scheduler,
        "frames": len(frames),
        "height": job["height"],
        "width": job["width"],
        "worker": renderer.worker,
        "host": socket.gethostname(),
        "device": renderer.device_name(),
        "dtype": str(renderer.dtype).removeprefix("torch."),
        "precision": renderer.precision,
        "compiled": renderer.compiled,
        "memory_plan": renderer.plan.name,
        "versions": versions(),
        "timings_s": timings,
        # When the render held the device (Unix seconds): the device's idle time between jobs.
        "rendering": {"started": started_at, "ended": started_at + timings["total"]},
        "caches": renderer.cache_stats(),
        "variant_switched": renderer.last_switched,
        "rendered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if job.get("image") is not None:
        picture = renderer.input_image(job["image"])
        metadata["image"] = {**job["image"], "width": picture.width, "height": picture.height}
    return Rendered(job, frames, timings, metadata)


def upload(rendered: Rendered, store: Store, fence: Callable[[], None] | None = None) -> dict:
    """Encode a rendered job and write it to the store; returns the result the task reports: key,
    status, output URIs, worker. `fence()` runs right before the first write and raises if this
    process may no longer write (its lease was taken over meanwhile)."""
    job, timings, metadata = rendered.job, rendered.timings, rendered.metadata
    key, worker = job["key"], metadata["worker"]
    upload_started = time.perf_counter()
    mp4, png = encode_outputs(rendered.frames, job["fps"])
    if fence is not None:
        fence()
    # The MP4 goes last: a video in the store means its poster and metadata are there too.
    store.write_bytes(video_path(key, "png"), png)
    store.write_bytes(video_path(key, "json"), json.dumps(metadata, indent=2).encode())
    store.write_bytes(video_path(key, "mp4"), mp4)
    timings["export_upload"] = time.perf_counter() - upload_started
    observe_render(timings)
    caches = metadata["caches"]
    log.info(
        "%s: %s rendered in %.2fs (%s frames %sx%s, %s steps; variant %.1f ms), uploaded in %.2fs; "
        "adapter cache hits/misses: disk %d/%d, host %d/%d, device %d/%d",
        worker, key[:12], timings["total"], metadata["frames"], job["width"], job["height"], job["steps"],
        timings["variant"] * 1e3, timings["export_upload"],
        caches["adapter_files"]["hits"], caches["adapter_files"]["misses"],
        caches["adapter_host"]["hits"], caches["adapter_host"]["misses"],
        caches["device_factors"]["hits"], caches["device_factors"]["misses"],
    )  # fmt: skip
    seconds = round(timings["total"] + timings["export_upload"], 3)
    return {"key": key, "worker": worker, **output_uris(store, key), "status": "done", "seconds": seconds}


def render_job(
    renderer: Renderer,
    store: Store,
    job: dict,
    progress: Progress | None = None,
    fence: Callable[[], None] | None = None,
) -> dict:
    """Render a finished job into the store, unless its video is already there, in this thread
    (`lorafleet render`); returns the result a task reports. Workers upload in the background
    (workers/uploads.py)."""
    key = job["key"]
    if video_exists(store, key):
        log.info("%s: %s already in the store, not rendered again", renderer.worker, key[:12])
        return {"key": key, "worker": renderer.worker, **output_uris(store, key), "status": "exists"}
    return upload(render_frames(renderer, job, progress), store, fence)


def versions() -> dict:
    """Versions of what decides the pixels, for the metadata."""
    import diffusers

    return {"lorafleet": common.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
