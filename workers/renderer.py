"""Rendering a job on the warm pipeline (workers/host.py): its fused variant (workers/variants.py),
its prompt's embeddings, a render with a CPU-seeded generator, checked for NaN, with the metadata
the store keeps beside the video. Encoding and writing it is workers/outputs.py."""

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

import common
from common.errors import MemoryBudgetError, RenderError
from common.images import decoded_bytes, read_image_url
from common.job import Job, ResolvedImage
from common.leases import Pace
from common.reading import ReadPolicy
from common.settings import DraftCache, Settings
from workers.adapter_cache import AdapterCache, AdapterFiles
from workers.draft import reset_draft_cache
from workers.host import PipelineHost, compiled_graphs
from workers.lru import LRU, CacheCounts
from workers.memory import fit_problem
from workers.variants import Term, VariantEngine

IMAGE_CACHE_BYTES = 512 * 2**20
log = logging.getLogger("lorafleet.render")
Progress = Callable[[int, int], None]


class Renderer(PipelineHost):
    """The warm pipeline of PipelineHost, and what renders jobs on it: the variant engine, the
    adapter caches, the prompt-embedding cache and the decoded input images."""

    def __init__(
        self,
        model_ref: str,
        device: str,
        settings: Settings,
        worker: str,
        precision: str = "bf16",
        compiled: bool | None = None,
        attention: str = "sdpa",
        cache: DraftCache | None = None,
    ):
        super().__init__(model_ref, device, settings, worker, precision, attention, cache)
        self.prompts = PromptEmbeddings(self.pipe, self.info.max_text_tokens, settings.prompt_cache_size)
        self.variants = VariantEngine(
            self.pipe.transformer,
            settings.adapter_device_cache_mb * 2**20,
            settings.variant_cache_size,
            self.plan.pristine_on_host,
            device=self.device,
            originals=self.originals,
        )
        self.policy = ReadPolicy.from_settings(settings, self.store.location)
        files = AdapterFiles(settings.adapter_cache_dir, settings.adapter_disk_cache_mb * 2**20, self.policy)
        self.adapters = AdapterCache(files, settings.adapter_host_cache_mb * 2**20, self.variants.layer_sizes())
        # decoded input images by content hash, by their bytes (an 8192² image is 200 MB): a sweep reuses its few
        self.images = LRU(IMAGE_CACHE_BYTES, size=decoded_bytes)
        if settings.compile if compiled is None else compiled:
            self.compile(settings)  # after the variant engine: the graph sees the weights as variants leave them
        self.load_seconds = time.perf_counter() - self.started
        self.rendered = 0
        self.last_switched = False  # whether the last render had to switch variants

    def _terms(self, job: Job) -> tuple[list[Term], tuple]:
        """The job's adapters as (adapter, weight, alpha) terms, and the variant's identity."""
        combination = job.combination
        if not combination:  # the base model: no adapter to read
            return [], ()
        terms = [(self.adapters.get(a.url, a.sha256), a.weight, a.alpha) for a in job.adapters]
        return terms, (combination, float(job.lora_scale))

    def render(self, job: Job, progress: Progress | None = None) -> tuple[list, dict]:
        """The job's frames (a list of H×W×3 float arrays in [0, 1]) and its timings in seconds."""
        timings = {}
        started = time.perf_counter()
        tile = self._check_memory(job)
        # The job's inputs first: one that cannot be read fails the job before its variant is built.
        image = self.input_image(job.image) if self.info.takes_image else None
        terms, variant = self._terms(job)
        timings["adapters"] = time.perf_counter() - started
        fused = job.fuse
        self.last_switched = self.variants.apply(terms if fused else [], job.lora_scale, variant if fused else ())
        timings["variant"] = time.perf_counter() - started - timings["adapters"]

        def on_step_end(pipe, step, timestep, tensors):
            if step + 1 == steps:
                timings["denoise"] = time.perf_counter() - denoise_started
                check_finite(tensors["latents"], "the latents")
            if progress is not None:
                progress(step + 1, steps)
            return tensors

        prompt_embeds, negative_prompt_embeds = self.prompts.get(job.prompt, job.negative_prompt)
        timings["prompt"] = time.perf_counter() - started - timings["adapters"] - timings["variant"]
        steps = job.steps
        denoise_started = time.perf_counter()
        call = dict(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_frames=job.num_frames,
            height=job.height,
            width=job.width,
            num_inference_steps=steps,
            guidance_scale=job.guidance_scale,
            use_dynamic_cfg=job.use_dynamic_cfg,
            # Noise from a CPU generator is the same on every device (diffusers' advice).
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="np",
            callback_on_step_end=on_step_end,
        )
        if image is not None:
            call["image"] = image

        def run():
            if self.cache is not None:
                reset_draft_cache(self.pipe)
            if fused or not terms:
                return self.pipe(**call).frames[0]
            return self._render_unfused(terms, job.lora_scale, call)

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

    def input_image(self, image: ResolvedImage):
        """A job's input image (PIL, RGB), read once per content hash; the pipeline resizes it."""
        found = self.images.get(image.sha256)
        if found is None:  # images are read under the adapters' policy
            found = read_image_url(image.url, image.sha256, self.policy)
            self.images.put(image.sha256, found)
        return found

    def _check_memory(self, job: Job) -> bool:
        """Fail a job that cannot fit the worker's memory budget before it renders, with the reason;
        returns whether it fits only with the VAE decoding in tiles (switched on for this job)."""
        size = (job.num_frames, job.height, job.width)
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

    def cache_stats(self) -> "CacheStats":
        """The caches' hits, misses and sizes, and variant switches, since the worker started."""
        variants = self.variants
        return CacheStats(
            adapter_files=self.adapters.files.stats(),
            adapter_host=self.adapters.lru.stats(),
            prompt_embeddings=self.prompts.lru.stats(),
            device_factors=variants.factors.stats(),
            fused_variants=variants.variants.stats() if variants.variants is not None else None,
            switches=variants.switches,
            pristine_bytes=variants.pristine_bytes,
            compiled_graphs=compiled_graphs() if self.compiled else None,
        )


@dataclass(frozen=True)
class CacheStats:
    """A renderer's caches and variant switches since its worker started: one typed shape for the
    worker's metrics, each job's metadata ("caches") and the upload's log line."""

    adapter_files: CacheCounts  # adapter files on disk, by content hash
    adapter_host: CacheCounts  # parsed adapter tensors in host memory
    prompt_embeddings: CacheCounts
    device_factors: CacheCounts  # adapters' stacked factors on the device
    fused_variants: CacheCounts | None  # whole fused variants kept (LORAFLEET_VARIANT_CACHE_SIZE), if any
    switches: int
    pristine_bytes: int
    compiled_graphs: int | None  # the graphs compiled so far, for a compiled renderer

    def as_dict(self) -> dict:
        """As the job metadata holds it."""
        counts = {name: value.as_dict() for name, value in vars(self).items() if isinstance(value, CacheCounts)}
        plain = {name: value for name, value in vars(self).items() if isinstance(value, int) and value is not None}
        return counts | plain


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


@dataclass
class Rendered:
    """A job's frames and metadata, rendered and not yet in the store."""

    job: Job
    frames: list
    timings: dict
    metadata: dict
    caches: CacheStats  # as they stood after this render (the metadata holds them as a dict)

    @property
    def pace(self) -> dict:
        """Its Pace (common/leases/records.py), for the worker's heartbeat: the GPU's time, which the
        background upload does not take."""
        job, timings = self.job, self.timings
        pixels = job.num_frames * job.height * job.width
        step_s = timings["denoise"] / job.steps
        return Pace(pixels=pixels, step_s=step_s, other_s=timings["total"] - timings["denoise"]).model_dump()


def render_frames(renderer: Renderer, job: Job, progress: Progress | None = None) -> Rendered:
    """Render a finished job (adapters resolved, key set) and gather its metadata."""
    key = job.key
    started_at = time.time()
    frames, timings = renderer.render(job, progress)
    caches = renderer.cache_stats()
    metadata = {
        "key": key,
        "job": job.message(),
        "adapters": [a.model_dump(include={"uri", "sha256", "weight", "alpha"}) for a in job.adapters],
        "model": renderer.info.ref,
        "scheduler": renderer.info.scheduler,
        "frames": len(frames),
        "height": job.height,
        "width": job.width,
        "worker": renderer.worker,
        "host": socket.gethostname(),
        "device": renderer.device_name(),
        "dtype": str(renderer.dtype).removeprefix("torch."),
        "precision": renderer.precision,
        "attention": renderer.attention,
        "cache": renderer.cache.model_dump() if renderer.cache else None,  # a draft tier's hook, every parameter
        "compiled": renderer.compiled,
        "memory_plan": renderer.plan.name,
        "versions": versions(),
        "timings_s": timings,
        # When the render held the device (Unix seconds): the device's idle time between jobs.
        "rendering": {"started": started_at, "ended": started_at + timings["total"]},
        "caches": caches.as_dict(),
        "variant_switched": renderer.last_switched,
        "rendered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if job.image is not None:
        picture = renderer.input_image(job.image)
        metadata["image"] = {**job.image.model_dump(), "width": picture.width, "height": picture.height}
    return Rendered(job, frames, timings, metadata, caches)


def versions() -> dict:
    """Versions of what decides the pixels, for the metadata."""
    import diffusers

    return {"lorafleet": common.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
