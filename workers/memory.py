"""A worker's GPU memory plan: the cheapest arrangement of the pipeline that fits its budget.

At start the worker weighs its loaded model (a Footprint), estimates the peak of a render at the
model's default size under each arrangement, cheapest first, and takes the first that fits the
budget (LORAFLEET_GPU_MEMORY_GB; default: the card's free memory). Every arrangement moves tensors
and never changes the math, so all of them render the same frames.

The activation coefficients below were measured on an H200 with full-size random-weight 2B and 5B
models (`python benchmarks/memory_tiers.py --calibrate`, 2026-11-29):
    one CFG step (batch 2)      1.64 GB (2B), 2.82 GB (5B) at 49×480×720, linear in tokens × width
    VAE decode, untiled         15.8 GB at 480×720, 3.96 GB at 240×360: per output pixel of a frame,
                                whatever the frame count (the VAE decodes two latent frames at a time)
    VAE decode, tiled + sliced  4.05 GB at 480×720, 3.96 GB at 240×360: one tile's worth
    T5-XXL encoding, 226 tokens 0.15 GB
"""

import itertools
from dataclasses import dataclass, replace

import torch

GB = 1e9
STEP_BYTES = 56  # per (video + text) token per transformer channel, for one CFG step (measured 49 to 52)
DECODE_BYTES = 46_000  # per pixel of one output frame, untiled (measured 45,800)
FRAME_BYTES = 12  # per output pixel and channel: the float32 frames and their post-processing copy
ENCODE_BYTES = 80  # per text token per encoder channel, batch 2 (measured 80)
HEADROOM = 1.15  # on activations: the estimates are fitted to a few shapes
SLACK = 0.25 * GB  # the allocator's rounding and fragmentation


@dataclass(frozen=True)
class Plan:
    """An arrangement of the pipeline on one device; each one in PLANS adds a saving to the last."""

    name: str
    vae_tiling: bool = False  # decode in tiles and slices: a little slower
    text_encoder_offloaded: bool = False  # T5's blocks in host memory, streamed in per new prompt
    pristine_on_host: bool = False  # the variant engine's pristine weights in pinned host memory
    model_offload: bool = False  # each component on the device only while it runs

    def describe(self) -> str:
        """The plan's name and what it turns on, for the worker's log."""
        on = [
            field
            for field in ("vae_tiling", "text_encoder_offloaded", "pristine_on_host", "model_offload")
            if getattr(self, field)
        ]
        return f"{self.name} ({', '.join(on) or 'everything on the device'})"


PLANS = [
    Plan("resident"),
    Plan("vae-tiled", vae_tiling=True),
    Plan("text-encoder-offloaded", vae_tiling=True, text_encoder_offloaded=True),
    Plan("pristine-on-host", vae_tiling=True, text_encoder_offloaded=True, pristine_on_host=True),
    Plan("model-offload", True, True, True, model_offload=True),
]
PLAN_NAMES = [plan.name for plan in PLANS]


def plan_named(name: str) -> Plan:
    """The plan of this name (LORAFLEET_MEMORY_PLAN)."""
    for plan in PLANS:
        if plan.name == name:
            return plan
    raise ValueError(f'unknown memory plan "{name}"; plans: auto, {", ".join(PLAN_NAMES)}')


def nbytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


@dataclass(frozen=True)
class Footprint:
    """What a loaded pipeline needs on the device, in bytes, and what its activations scale with."""

    text_encoder: int
    text_encoder_blocks: int  # its blocks: what streaming keeps on the host
    text_encoder_block: int  # the largest of them: what streaming holds on the device at once
    transformer: int
    vae: int
    pristine: int  # the pristine copy of the layers adapters usually target (every block's attention)
    adapters: int  # the adapter factors' device budget (LORAFLEET_ADAPTER_DEVICE_CACHE_MB)
    width: int  # the transformer's channels
    text_tokens: int
    text_width: int
    patch: int
    patch_t: int
    vae_scale: int  # pixels per latent pixel
    vae_frames: int  # frames per latent frame
    tile_pixels: int  # one VAE tile's pixels

    @classmethod
    def of(cls, pipe, adapter_budget_bytes: int) -> "Footprint":
        """The footprint of a loaded CogVideoX pipeline."""
        transformer, vae, text_encoder = pipe.transformer, pipe.vae, pipe.text_encoder
        config = transformer.config
        attention = [
            m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and ".attn1.to_" in name
        ]
        blocks = text_encoder_blocks(text_encoder)
        return cls(
            text_encoder=nbytes(text_encoder),
            text_encoder_blocks=sum(nbytes(block) for block in blocks),
            text_encoder_block=max(nbytes(block) for block in blocks),
            transformer=nbytes(transformer),
            vae=nbytes(vae),
            pristine=sum(m.weight.numel() * m.weight.element_size() for m in attention),
            adapters=adapter_budget_bytes,
            width=config.num_attention_heads * config.attention_head_dim,
            text_tokens=config.max_text_seq_length,
            text_width=text_encoder.config.d_model,
            patch=config.patch_size,
            patch_t=config.patch_size_t or 1,
            vae_scale=pipe.vae_scale_factor_spatial,
            vae_frames=pipe.vae_scale_factor_temporal,
            tile_pixels=vae.tile_sample_min_height * vae.tile_sample_min_width,
        )

    def resident(self, plan: Plan) -> int:
        """Bytes that stay on the device between jobs under this plan."""
        held = self.adapters
        if not plan.model_offload:
            held += self.transformer + self.vae
            held += self.text_encoder - (self.text_encoder_blocks if plan.text_encoder_offloaded else 0)
        return held + (0 if plan.pristine_on_host else self.pristine)

    def phases(self, plan: Plan, num_frames: int, height: int, width: int) -> dict[str, int]:
        """Bytes each phase of a render adds to the resident ones, activations with headroom."""
        latent_frames = (num_frames - 1) // self.vae_frames + 1
        tokens = (
            -(-latent_frames // self.patch_t)
            * (height // self.vae_scale // self.patch)
            * (width // self.vae_scale // self.patch)
        )
        pixels = height * width
        frames = FRAME_BYTES * 3 * num_frames * pixels
        decode = DECODE_BYTES * (min(pixels, self.tile_pixels) if plan.vae_tiling else pixels)
        encode = ENCODE_BYTES * 2 * self.text_tokens * self.text_width
        phases = {
            "encode": HEADROOM * encode,
            "switch": self.pristine * (2 if plan.pristine_on_host else 1),  # W0 brought over, and the fused result
            "denoise": HEADROOM * STEP_BYTES * (tokens + self.text_tokens) * self.width,
            "decode": HEADROOM * (decode + frames),
        }
        if plan.model_offload:  # the running component comes in whole
            phases["encode"] += self.text_encoder
            phases["denoise"] += self.transformer
            phases["decode"] += self.vae
        elif plan.text_encoder_offloaded:
            phases["encode"] += 2 * self.text_encoder_block  # one block running, the last one's being freed
        return {name: int(value) for name, value in phases.items()}

    def peak(self, plan: Plan, num_frames: int, height: int, width: int) -> int:
        """The estimated peak of one render of this size under this plan, in bytes."""
        return int(self.resident(plan) + max(self.phases(plan, num_frames, height, width).values()) + SLACK)


def text_encoder_blocks(text_encoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The T5 encoder's blocks (nearly all of its weights)."""
    return list(text_encoder.encoder.block)


def offload_text_encoder(text_encoder: torch.nn.Module, device: torch.device) -> None:
    """Put T5 on `device` but for its blocks, which wait in host memory and stream over when it runs."""
    blocks = text_encoder_blocks(text_encoder)
    stream_blocks(blocks, device)
    streamed = {id(t) for block in blocks for t in itertools.chain(block.parameters(), block.buffers())}
    for tensor in itertools.chain(text_encoder.parameters(), text_encoder.buffers()):
        if id(tensor) not in streamed:  # the embeddings and the final norm
            tensor.data = tensor.data.to(device)


def stream_blocks(blocks: list[torch.nn.Module], device: torch.device) -> None:
    """Keep each block's weights in pinned host memory and on `device` only while the block runs:
    T5-XXL's 9.5 GB cross over in about half a second per encoding, one 0.4 GB block at a time.
    The same weights and kernels as resident, so the same embeddings bit for bit. (diffusers' group
    offloading does this too, but took 18 s an encoding on an H200 and left the blocks on the GPU.)"""
    for block in blocks:
        host = [(t, t.data.pin_memory()) for t in itertools.chain(block.parameters(), block.buffers())]
        for tensor, pinned in host:
            tensor.data = pinned

        def bring(module, args, host=host):
            for tensor, pinned in host:
                tensor.data = pinned.to(device, non_blocking=True)

        def send_back(module, args, output, host=host):
            # The device copies go back to the allocator, which reuses them only after the kernels
            # queued on this stream that read them.
            for tensor, pinned in host:
                tensor.data = pinned

        block.register_forward_pre_hook(bring)
        block.register_forward_hook(send_back)


def memory_budget(gpu_memory_gb: float | None, device: torch.device) -> float | None:
    """The bytes a worker may use on its device: the setting, else a GPU's free memory; None on the CPU."""
    if gpu_memory_gb is not None:
        return gpu_memory_gb * GB
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return None


def choose(footprint: Footprint, budget: float | None, size: tuple[int, int, int], name: str = "auto") -> Plan:
    """The named plan, or (auto) the cheapest whose peak at `size` fits `budget` bytes; raises
    ValueError with the reason when none does."""
    if name != "auto":
        return plan_named(name)
    if budget is None:
        return PLANS[0]
    for plan in PLANS:
        if footprint.peak(plan, *size) <= budget:
            return plan
    raise ValueError(
        f"no memory plan fits {budget / GB:.1f} GB at {'×'.join(map(str, size))}: even {PLANS[-1].name} needs "
        f"about {footprint.peak(PLANS[-1], *size) / GB:.1f} GB"
    )


def fit_problem(footprint: Footprint, plan: Plan, budget: float | None, size: tuple[int, int, int]) -> str | None:
    """Why a job of `size` cannot render under `plan` within `budget` bytes, with what would fit;
    None when it fits."""
    if budget is None:
        return None
    needed = footprint.peak(plan, *size)
    if needed <= budget:
        return None
    shape = "×".join(map(str, size))
    later = PLANS[PLAN_NAMES.index(plan.name) + 1 :]
    fits = [p for p in later if footprint.peak(p, *size) <= budget]
    advice = (
        f"a worker with LORAFLEET_MEMORY_PLAN={fits[0].name} would fit it"
        if fits
        else "no plan fits it on this card: ask for fewer frames or pixels"
    )
    return (
        f"{shape} needs about {needed / GB:.1f} GB of GPU memory under memory plan {plan.name}, "
        f"more than this worker's {budget / GB:.1f} GB budget; {advice}"
    )


def with_settings(plan: Plan, vae_tiling: bool, pristine_on_host: bool) -> Plan:
    """The plan with the savings the settings ask for on top (LORAFLEET_VAE_TILING, _PRISTINE_ON_HOST)."""
    return replace(
        plan, vae_tiling=plan.vae_tiling or vae_tiling, pristine_on_host=plan.pristine_on_host or pristine_on_host
    )
