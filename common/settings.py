"""lorafleet's settings: read from the environment (prefix LORAFLEET_) here and nowhere else.

Every CLI flag maps onto one of these fields; the site's settings page (docs/hooks.py) is generated from them.
"""

import json
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import ModelError

Precision = Literal["bf16", "fp8"]
Attention = Literal["sdpa", "fa4"]


CacheHook = Literal["taylorseer", "fastercache", "pab", "first-block"]
# Each of diffusers' cache hooks a draft tier may use, with the parameters a tier may set and
# lorafleet's defaults for CogVideoX: TaylorSeer's and First-Block-Cache's are diffusers' own
# defaults, FasterCache's and PAB's the values diffusers documents for CogVideoX
# (benchmarks/cache_hooks.py measured each on the H200).
CACHE_PARAMS: dict[str, dict[str, int | float]] = {
    "taylorseer": {"cache_interval": 5, "max_order": 1, "disable_cache_before_step": 3, "factors_bits": 32},
    "fastercache": {"spatial_attention_block_skip_range": 2, "unconditional_batch_skip_range": 5, "attention_weight": 0.3},
    "pab": {"spatial_attention_block_skip_range": 2},
    "first-block": {"threshold": 0.2},
}
# The parameters diffusers' hooks divide by (a step number modulo each): 0 would fail every job of
# the tier with ZeroDivisionError, so a tier is refused as its settings are read.
CACHE_PARAM_MINIMUMS = {"cache_interval": 1, "spatial_attention_block_skip_range": 1, "unconditional_batch_skip_range": 1}
# Parameters that take one of a few values: TaylorSeer keeps its predictors in fp32 or bf16 (half
# the memory its factors take: two orders of each block's attention output).
CACHE_PARAM_CHOICES = {"factors_bits": (16, 32)}
# Parameters added after drafts were rendered, with the value those drafts had: left out of the
# identity at that value, so the drafts already in the store keep their keys.
CACHE_PARAM_SINCE = {"factors_bits": 32}


class DraftCache(BaseModel):
    """A draft tier: one of diffusers' cache hooks on the transformer, which reuses or predicts
    some of a step's work from earlier steps (about 0.5–0.8× the time, not the exact pixels). The
    hook and every parameter, defaults filled in, are in the job key: a draft never stands in for
    an exact render."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hook: CacheHook = Field(description="which of diffusers' cache hooks: " + ", ".join(CACHE_PARAMS))
    params: dict[str, float] = Field(default_factory=dict, description="the hook's parameters over lorafleet's defaults")

    @field_validator("params", mode="before")
    @classmethod
    def _numbers(cls, params):
        if isinstance(params, dict):
            for name, value in params.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                    raise ValueError(f"{name}: must be a finite number ≥ 0, got {json.dumps(value, default=str)}")
        return params

    @model_validator(mode="after")
    def _known_and_filled(self) -> "DraftCache":
        defaults = CACHE_PARAMS[self.hook]
        unknown = sorted(set(self.params) - set(defaults))
        if unknown:
            raise ValueError(f"{self.hook} has no parameter {unknown[0]}; its parameters: {', '.join(defaults)}")
        for name, value in self.params.items():
            if isinstance(defaults[name], int) and value != int(value):
                raise ValueError(f"{name}: must be a whole number, got {value}")
            if name in CACHE_PARAM_CHOICES and value not in CACHE_PARAM_CHOICES[name]:
                raise ValueError(f"{name}: one of {', '.join(map(str, CACHE_PARAM_CHOICES[name]))}, got {value:g}")
            if value < CACHE_PARAM_MINIMUMS.get(name, 0):
                raise ValueError(f"{name}: must be at least {CACHE_PARAM_MINIMUMS[name]} ({self.hook} divides by it), got {value:g}")
        filled = {name: type(default)(self.params.get(name, default)) for name, default in defaults.items()}
        object.__setattr__(self, "params", filled)
        return self

    def identity(self) -> str:
        """The hook and its parameters as canonical JSON: what enters the job key."""
        params = {name: v for name, v in self.params.items() if CACHE_PARAM_SINCE.get(name) != v}
        return json.dumps({"hook": self.hook, "params": params}, sort_keys=True, separators=(",", ":"))


class ModelTier(BaseModel):
    """A model alias: which pipeline, in which precision and attention kernel, compiled or not, and
    whether a draft tier. Precision, kernel and draft cache change the pixels, so each is part of
    the job key (when not the default); compiling changes only how the same sums are rounded, and
    is not."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str = Field(description="a local pipeline folder or a hub id")
    precision: Precision = Field(
        "bf16", description="bf16 (exact, the default) or fp8 (torchao per-row fp8 linear layers: faster, not exact)"
    )
    compile: bool | None = Field(None, description="torch.compile the transformer; none: LORAFLEET_COMPILE")
    attention: Attention = Field(
        "sdpa",
        description="the attention kernel: sdpa (torch's, the default) or fa4 (FlashAttention-4 on Hopper or "
        "Blackwell: faster, other rounding, so in the job key)",
    )
    cache: DraftCache | None = Field(
        None,
        description='a draft tier: {"hook": "taylorseer"} (or fastercache, pab, first-block, with "params"); '
        "faster, not exact, so in the job key",
    )


class Settings(BaseSettings):
    """The fleet's configuration; each field is `LORAFLEET_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL for the Celery broker and result backend (redis:// or rediss://).",
    )
    store_url: str = Field("./results", description="fsspec URL of the shared store: a folder, s3://bucket/prefix, ...")
    model: str = Field(
        "THUDM/CogVideoX-5b",
        description="The fleet's default model: a local pipeline folder or a hub id; served on queue `render`.",
    )
    models: dict[str, str | ModelTier] = Field(
        default_factory=dict,
        description='Other models by alias, as JSON: {"2b": "/models/CogVideoX-2b", "5b-fast": {"ref": '
        '"THUDM/CogVideoX-5b", "precision": "fp8", "compile": true}}; alias A is served on queue `render.A`.',
    )
    visibility_timeout_s: int = Field(
        6 * 3600,
        description="Seconds before Redis hands an unacknowledged job to another worker; must exceed the longest render.",
    )
    max_jobs: int = Field(100_000, description="Most jobs one submitted file may expand to.")
    max_video_pixels: int = Field(
        100_000_000,
        description="Most frames × height × width one job may ask for (CogVideoX 1.5's 81×768×1360 is 85 million).",
    )
    max_adapter_mb: int = Field(
        4096, description="Largest adapter file read, in MiB (a rank-128 LoRA of CogVideoX-5B is about 0.5 GB)."
    )
    adapter_schemes: list[str] = Field(
        ["file", "s3", "gs", "hf"],
        description='URL schemes adapters may be read from, as JSON (plain http is off: add "https" to allow it); '
        "the store is always allowed.",
    )
    adapter_roots: list[str] = Field(
        [],
        description="Local folders adapters may be read from, as JSON; empty: any local path (the store is always allowed).",
    )
    read_timeout_s: float = Field(20, description="Seconds a remote adapter read (S3, GCS, the hub) may go unanswered.")
    lease_s: float = Field(
        30,
        description="A running job's lease: if its worker stops refreshing it this long, the job is delivered again.",
    )
    max_deliveries: int = Field(3, description="Deliveries a job may lose its worker on before it is failed.")
    store_retries: int = Field(
        3, description="Retries, with back-off, of a job that failed on store or network trouble."
    )
    shutdown_timeout_s: float = Field(
        600, description="On SIGTERM, how long a worker may finish its job before handing it back to the queue."
    )
    result_expires_s: int = Field(7 * 24 * 3600, description="Seconds job results stay in Redis.")
    dtype: str = Field(
        "auto", description="Weights dtype on the worker: auto (bf16 on a GPU, fp32 on the CPU), bf16, fp16, fp32."
    )
    vae_tiling: bool = Field(
        False,
        description="Decode the video in tiles and slices whatever the memory plan: less GPU memory, a little slower.",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="GPU memory a worker may use, in GB (10^9 bytes); none: the card's free memory at start. "
        "The memory plan is chosen to fit it, and a job that cannot fit fails before rendering.",
    )
    memory_plan: Literal[
        "auto", "resident", "vae-tiled", "text-encoder-offloaded", "pristine-on-host", "model-offload"
    ] = Field(
        "auto",
        description="How a worker arranges the pipeline on its GPU: auto (the cheapest that fits the budget), resident, "
        "vae-tiled, text-encoder-offloaded, pristine-on-host, model-offload.",
    )
    prompt_cache_size: int = Field(
        256, ge=0, description="Prompt embeddings a worker keeps in host memory (a sweep's jobs share prompts)."
    )
    metrics_port: int | None = Field(
        None,
        description="A worker serves /metrics, /healthz and /readyz on this port; `lorafleet workers` gives "
        "its N workers this port and the next N-1. None: no server.",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="The address the metrics and probe servers (a worker's, the exporter's) listen on: this host "
        "only by default; 0.0.0.0 where Prometheus, kubelet or KEDA reach it from outside (the images set it).",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: a line a record, for a terminal; json: one JSON object a line (time, level, logger, "
        "message, and worker, job key and batch where there are ones), as cluster log pipelines read them.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="The least severe records logged (-v: DEBUG)."
    )
    eval_clip: str | None = Field(
        None,
        description="The CLIP model a sweep's evaluations use (a hub id such as openai/clip-vit-large-patch14, "
        "or a local folder); none: the report has no prompt-adherence numbers.",
    )
    adapter_cache_dir: str = Field(
        "~/.cache/lorafleet/adapters",
        description="Folder where a worker host keeps adapter files by content hash (an S3 adapter is fetched once).",
    )
    adapter_disk_cache_mb: int = Field(20480, description="Disk budget (MiB) of the adapter file cache.")
    adapter_host_cache_mb: int = Field(4096, description="Host memory budget (MiB) for parsed adapter tensors.")
    adapter_device_cache_mb: int = Field(2048, description="GPU memory budget (MiB) for adapter tensors.")
    variant_cache_size: int = Field(
        0,
        description="Whole fused variants kept on the device (each as large as the targeted weights: 3.2 GB, 3.0 GiB, on 5B).",
    )
    pristine_on_host: bool = Field(
        False,
        description="Keep the pristine base weights in pinned host memory instead of on the GPU (slower switches).",
    )
    precision: Precision = Field(
        "bf16", description="The default model's precision: bf16 (exact) or fp8 (faster, not exact; in the job key)."
    )
    attention: Attention = Field(
        "sdpa",
        description="The default model's attention kernel: sdpa (torch's) or fa4 (FlashAttention-4, the fa4 "
        "extra; Hopper or Blackwell; about 10 % faster a step on an H200, other pixels: in the job key).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the transformer at start, for the model's default size; switching variants never "
        "recompiles, other sizes run uncompiled.",
    )
    compile_backend: str = Field("inductor", description="The torch.compile backend used with `compile`.")
    compile_scope: Literal["blocks", "whole"] = Field(
        "blocks",
        description="What `compile` compiles: `blocks` compiles one transformer block, whose graph all the model's "
        "identical blocks share (a cold compile in a fraction of the time); `whole` the whole transformer in one graph.",
    )
    compile_cache: bool = Field(
        True,
        description="Share torch.compile's artifacts through the store (compile-cache/) once compile_cache_secret "
        "is set: the first worker of a model, precision, size, GPU and software versions saves them signed, later "
        "ones load only entries with the fleet's signature and compile in seconds.",
    )
    prefetch_weights: bool = Field(
        True,
        description="While a worker imports torch and diffusers, read its local model folder's weight files in the "
        "background into the page cache, so that loading them reads memory, not the disk.",
    )
    compile_cache_secret: SecretStr | None = Field(
        None,
        description="A secret the fleet's workers share: compile artifacts are signed with it, and an entry without "
        "this fleet's signature is never loaded (artifacts are code). None: nothing is shared, each worker compiles "
        "on its own. Set but empty: refused.",
    )

    @field_validator("compile_cache_secret")
    @classmethod
    def _secret_not_empty(cls, secret: SecretStr | None) -> SecretStr | None:
        # An empty secret would sign with a key anyone knows: refuse it rather than share unsafely.
        if secret is not None and not secret.get_secret_value().strip():
            raise ValueError("set but empty: give a secret (e.g. `openssl rand -hex 32`), or unset it to share nothing")
        return secret

    def model_tier(self, alias: str | None) -> ModelTier:
        """The model behind an alias, its precision and compile mode; None names the fleet's default model."""
        if alias is None:
            return ModelTier(ref=self.model, precision=self.precision, compile=self.compile, attention=self.attention)
        if alias not in self.models:
            known = ", ".join(sorted(self.models)) or "none configured (LORAFLEET_MODELS)"
            raise ModelError(f'unknown model alias "{alias}"; known aliases: {known}')
        tier = self.models[alias]
        if isinstance(tier, str):
            tier = ModelTier(ref=tier)
        return tier if tier.compile is not None else tier.model_copy(update={"compile": self.compile})


def queue_for(alias: str | None) -> str:
    """The Celery queue that serves a model alias: `render` for the default model."""
    return "render" if alias is None else f"render.{alias}"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment of a child process that must see these settings (a supervisor's workers):
    this one's, with every setting written out as LORAFLEET_<NAME>."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:  # unset stays unset ("None" would be a value: a port, a model's name)
            env.pop(f"LORAFLEET_{name.upper()}", None)
        elif isinstance(value, SecretStr):  # the secret itself, not its masked form
            env[f"LORAFLEET_{name.upper()}"] = value.get_secret_value()
        else:
            env[f"LORAFLEET_{name.upper()}"] = (
                json.dumps(value) if isinstance(value, (bool, list, dict)) else str(value)
            )
    return env
