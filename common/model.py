"""What the producer must know of a model without loading it: its render defaults and rules.

Read from the pipeline folder's JSON configs (or the hub's copies of them), never its weights.
"""

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache

from common.errors import ModelError
from common.reading import hub_reachable


@dataclass(frozen=True)
class ModelInfo:
    """A model's identity, its default render size and the rules a render size must follow."""

    ref: str  # the folder or hub id, as configured: part of every job key
    scheduler: str  # the scheduler class the folder names: part of every job key
    num_frames: int
    height: int
    width: int
    frame_step: int  # num_frames must be frame_step·N + 1
    size_step: int  # height and width must be multiples of this
    max_text_tokens: int
    takes_image: bool = False  # an image-to-video model: every job gives an `image`
    fixed_size: bool = False  # learned positional embeddings (CogVideoX-5B-I2V): only its own height × width
    precision: str = "bf16"  # the weights as the workers run them: fp8 changes pixels, so it is in the key
    attention: str = "sdpa"  # the attention kernel the workers run: fa4 rounds otherwise, so it is in the key
    cache: str = ""  # a draft tier's cache hook (DraftCache.identity), "" for exact renders: in the key
    # The transformer's linear layers, name -> (out_features, in_features): what adapters may target.
    linear_layers: dict = field(default_factory=dict, compare=False)

    def check_size(self, num_frames: int, height: int, width: int) -> list[tuple[str, str]]:
        """(field, problem) for each render dimension this model cannot take."""
        problems = []
        if num_frames < 1 or (num_frames - 1) % self.frame_step:
            problems.append(("num_frames", f"must be {self.frame_step}·N+1 for this model (e.g. {self.num_frames})"))
        for name, value in (("height", height), ("width", width)):
            if value < self.size_step or value % self.size_step:
                problems.append((name, f"must be a positive multiple of {self.size_step} for this model"))
            elif self.fixed_size and value != getattr(self, name):
                problems.append((name, f"must be {getattr(self, name)}: this model renders only at its own size"))
        return problems


def _read_config(ref: str, relpath: str) -> dict:
    if os.path.isdir(ref):
        path = os.path.join(ref, relpath)
        if not os.path.isfile(path):
            raise ModelError(f'model folder "{ref}" has no {relpath}: is it a diffusers pipeline folder?')
    elif ref.startswith(("/", ".", "~")) or ref.count("/") != 1:
        raise ModelError(f'model "{ref}" is not a folder here (nor a hub id like THUDM/CogVideoX-5b)')
    elif not hub_reachable(5.0):  # offline, the hub client retries for a minute and more
        raise ModelError(
            f'model "{ref}" is not a local folder, and the Hugging Face hub is not reachable from here: '
            "set LORAFLEET_MODEL to a pipeline folder (after `make demo`: $PWD/demo/model)"
        )
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(ref, relpath)
        except Exception as exc:
            raise ModelError(
                f'model "{ref}" is neither a local folder nor a reachable hub repo ({type(exc).__name__}); '
                "set LORAFLEET_MODEL to a pipeline folder"
            ) from exc
    with open(path) as f:
        return json.load(f)


@lru_cache(maxsize=16)
def model_info(ref: str, precision: str = "bf16", attention: str = "sdpa", cache: str = "") -> ModelInfo:
    """The ModelInfo of a pipeline folder or hub id, read from its config files, run in `precision`
    with the `attention` kernel and, for a draft tier, the `cache` hook (DraftCache.identity)."""
    if os.path.isdir(ref):
        ref = os.path.abspath(ref)  # one folder has one identity, however it was named
    pipeline = _read_config(ref, "model_index.json")
    transformer = _read_config(ref, "transformer/config.json")
    vae = _read_config(ref, "vae/config.json")
    scheduler = _read_config(ref, "scheduler/scheduler_config.json")
    spatial = 2 ** (len(vae.get("block_out_channels", [128, 256, 256, 512])) - 1)
    temporal = vae.get("temporal_compression_ratio", 4)
    patch = transformer.get("patch_size", 2)
    patch_t = transformer.get("patch_size_t") or 1
    # CogVideoX 1.0 takes 8N+1 frames, 1.5 (temporal patches of 2) 16N+1: two latent frames per step.
    frame_step = temporal * 2 * patch_t
    return ModelInfo(
        ref=ref,
        scheduler=scheduler.get("_class_name", "CogVideoXDPMScheduler"),
        num_frames=transformer.get("sample_frames", 49),
        height=transformer.get("sample_height", 60) * spatial,
        width=transformer.get("sample_width", 90) * spatial,
        frame_step=frame_step,
        size_step=spatial * patch,
        max_text_tokens=transformer.get("max_text_seq_length", 226),
        takes_image="ImageToVideo" in pipeline.get("_class_name", ""),
        fixed_size=bool(transformer.get("use_learned_positional_embeddings")),
        precision=precision,
        attention=attention,
        cache=cache,
        linear_layers=cogvideox_linear_layers(transformer),
    )


def cogvideox_linear_layers(config: dict) -> dict[str, tuple[int, int]]:
    """The linear layers of a CogVideoX transformer and their (out, in) sizes, from its config
    (the producer has no torch to build the model). tests/unit/test_model.py checks this table
    against the real module tree of every kind: 2B, 5B, 5B-I2V, 1.5 and 1.5-I2V."""
    inner = config.get("num_attention_heads", 30) * config.get("attention_head_dim", 64)
    time = config.get("time_embed_dim", 512)
    patch = config.get("patch_size", 2) ** 2 * (config.get("patch_size_t") or 1)
    layers = {
        "patch_embed.text_proj": (inner, config.get("text_embed_dim", 4096)),
        "time_embedding.linear_1": (time, inner),
        "time_embedding.linear_2": (time, time),
        "norm_out.linear": (2 * inner, time),
        "proj_out": (patch * config.get("out_channels", 16), inner),
    }
    if config.get("patch_size_t"):  # 1.5 embeds patches of 2 frames with a linear layer, not a convolution
        in_features = config.get("in_channels", 16) * patch
        layers["patch_embed.proj"] = (inner, in_features)
    if config.get("ofs_embed_dim"):  # 1.5's ofs embedding: a timestep embedding of its own
        ofs = config["ofs_embed_dim"]
        layers["ofs_embedding.linear_1"] = layers["ofs_embedding.linear_2"] = (ofs, ofs)
    for i in range(config.get("num_layers", 30)):
        block = f"transformer_blocks.{i}"
        for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"):
            layers[f"{block}.{name}"] = (inner, inner)
        layers[f"{block}.norm1.linear"] = layers[f"{block}.norm2.linear"] = (6 * inner, time)
        layers[f"{block}.ff.net.0.proj"] = (4 * inner, inner)
        layers[f"{block}.ff.net.2"] = (inner, 4 * inner)
    return layers


def model_resolver(settings):
    """`model_for(alias)`: the ModelInfo behind a job's `model` field (None: the fleet's default)."""

    def model_for(alias) -> ModelInfo:
        if alias is not None and not isinstance(alias, str):
            raise ModelError(f"must be a model alias (a string), got {json.dumps(alias)}")
        tier = settings.model_tier(alias)
        return model_info(tier.ref, tier.precision, tier.attention, tier.cache.identity() if tier.cache else "")

    return model_for
