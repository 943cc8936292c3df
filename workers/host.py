"""A warm pipeline on one device: loaded once, weighed, placed as the memory plan says (what waits
in host memory), in the model alias's tier (bf16 or fp8, compiled or not). Rendering a job on it
is workers/renderer.py; this is everything a worker sets up before its first job."""

import logging
import platform
import time

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from common.errors import MemoryBudgetError
from common.model import ModelInfo, model_info
from common.settings import DraftCache, Settings
from common.store import Store
from workers.attention import check_kernel, use_kernel
from workers.compile_cache import CompileCache, identity
from workers.draft import enable_draft_cache
from workers.fp8 import SavedWeights, check_fp8_device, quantize_transformer
from workers.memory import (
    GB,
    PLANS,
    Footprint,
    choose,
    memory_budget,
    offload_text_encoder,
    with_settings,
)

log = logging.getLogger("lorafleet.render")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The weights dtype: `auto` is bf16 on a GPU and fp32 on the CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[setting]


class PipelineHost:
    """One model's pipeline on one device, loaded, placed and in its tier. `originals` holds the
    bf16 weights from before fp8 quantization (None in bf16), which every fused variant is built from."""

    def __init__(
        self,
        model_ref: str,
        device: str,
        settings: Settings,
        worker: str,
        precision: str = "bf16",
        attention: str = "sdpa",
        cache: DraftCache | None = None,
    ):
        self.started = time.perf_counter()
        self.device = torch.device(device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        self.worker = worker
        self.precision = precision
        self.attention = attention
        self.cache = cache  # a draft tier's cache hook, None for exact renders
        if precision == "fp8":
            check_fp8_device(self.device)
        check_kernel(attention, self.device)
        self.info: ModelInfo = model_info(model_ref, precision, attention, cache.identity() if cache else "")
        self.store = Store(settings.store_url)  # the fleet's: adapters, images and compile artifacts
        self.budget = memory_budget(settings.gpu_memory_gb, self.device)  # before loading: the card's free memory
        # Loaded on the host, weighed, then placed on the device as the memory plan says.
        self.pipe = DiffusionPipeline.from_pretrained(model_ref, dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.footprint = Footprint.of(self.pipe, settings.adapter_device_cache_mb * 2**20)
        self.default_size = (self.info.num_frames, self.info.height, self.info.width)
        try:
            plan = choose(self.footprint, self.budget, self.default_size, settings.memory_plan)
        except ValueError as exc:
            raise MemoryBudgetError(f"{exc} (LORAFLEET_GPU_MEMORY_GB)") from None
        self.plan = with_settings(plan, settings.vae_tiling, settings.pristine_on_host)
        if self.budget is not None and self.footprint.peak(self.plan, *self.default_size) > self.budget:
            log.warning("%s: memory plan %s was asked for, but its estimate exceeds the budget", worker, self.plan.name)
        self.originals = None
        if precision == "fp8":
            if self.plan.model_offload:
                raise MemoryBudgetError("precision fp8 needs the transformer on the GPU: model-offload cannot serve it")
            # The bf16 weights from before quantization, which every variant is fused from, read
            # from the model's files when an adapter first touches them.
            linears = self.pipe.transformer.named_modules()
            names = [name for name, m in linears if isinstance(m, torch.nn.Linear)]
            self.originals = SavedWeights(self.info.ref, names, self.dtype)
        self._place()
        if precision == "fp8":
            quantize_transformer(self.pipe.transformer)
        use_kernel(self.pipe.transformer, attention)
        if cache is not None:
            enable_draft_cache(self.pipe, cache)
        self.compiled = False
        self.compile_seconds = None
        budget = "no budget" if self.budget is None else f"a {self.budget / GB:.1f} GB budget"
        log.info(
            "%s: memory plan %s: estimated peak %.1f GB at %s of %s (resident would need %.1f GB)",
            worker, self.plan.describe(), self.footprint.peak(self.plan, *self.default_size) / GB,
            "×".join(map(str, self.default_size)), budget, self.footprint.peak(PLANS[0], *self.default_size) / GB,
        )  # fmt: skip

    def compile(self, settings: Settings) -> None:
        """Compile the transformer now, for the model's default size, with the fleet's shared
        artifacts if the store has them (workers/compile_cache.py), and share them if it had not.

        Variants rewrite the weights in place, which never recompiles. A job of another size (or
        without guidance, a batch of one) would recompile while the queue waits: it runs
        uncompiled instead (`render` runs jobs under torch's "eager_on_recompile" stance)."""
        secret = settings.compile_cache_secret
        store = self.store if settings.compile_cache and secret else None
        if settings.compile_cache and not secret:
            log.info(
                "%s: compile cache: not shared (artifacts are code: set LORAFLEET_COMPILE_CACHE_SECRET, the same "
                "on every worker, to share signed ones through the store)", self.worker,
            )  # fmt: skip
        self.compiled = True
        size = self.default_size
        transformer, backend, scope = self.pipe.transformer, settings.compile_backend, settings.compile_scope
        described = identity(
            dict(transformer.config), self.precision, size, backend, scope, self.device, self.attention, self.info.cache
        )
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


def compiled_graphs() -> int:
    """How many graphs torch.compile has made in this process: constant after the first render."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
