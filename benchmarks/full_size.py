"""Full-size random-weight CogVideoX for the benchmarks: the transformers' configs, rank-R adapters,
and a whole pipeline folder loaded through `from_pretrained` like a real model.

Random weights time exactly like trained ones (DOMAIN.md). The pipeline is CogVideoX's real
architecture at full size: T5-XXL encoder, the 2B or 5B transformer, the VAE at diffusers'
defaults (which are CogVideoX's), with the tiny model's small tokenizer (a prompt's token ids
only pick embedding rows; the encoder still runs its 226 positions).
"""

import os
import time

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)

CONFIGS = {
    # diffusers' defaults are CogVideoX-2B's transformer; 5B differs in these fields.
    "2b": {},
    "5b": {"num_attention_heads": 48, "use_rotary_positional_embeddings": True, "num_layers": 42},
    "tiny": {
        "num_attention_heads": 4, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "time_embed_dim": 2,
        "text_embed_dim": 32, "num_layers": 1, "sample_width": 2, "sample_height": 2, "sample_frames": 9,
        "max_text_seq_length": 16,
    },
}  # fmt: skip
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
T5_XXL = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "decoder_start_token_id": 0,
}  # fmt: skip


def build_transformer(name: str, device, dtype: torch.dtype) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**CONFIGS[name])
    return model.to(dtype).eval().requires_grad_(False)


def write_adapters(model, rank: int, folder: str, dtype: torch.dtype, names=("a1", "a2")) -> dict[str, str]:
    """Random rank-`rank` adapters on every block's attention projections, in diffusers' format;
    small enough (B ~ 0.01) that a random model's output stays finite at any scale up to 1."""
    paths = {}
    for seed, name in enumerate(names, start=1):
        generator = torch.Generator().manual_seed(seed)
        layers = {}
        for i, _ in enumerate(model.transformer_blocks):
            for target in TARGETS:
                linear = model.get_submodule(f"transformer_blocks.{i}.attn1.{target}")
                layers[f"transformer_blocks.{i}.attn1.{target}.lora_A.weight"] = (
                    torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
                ).to(dtype)
                layers[f"transformer_blocks.{i}.attn1.{target}.lora_B.weight"] = (
                    torch.randn(linear.out_features, rank, generator=generator) * 0.01
                ).to(dtype)
        paths[name] = os.path.join(folder, name)
        CogVideoXPipeline.save_lora_weights(paths[name], transformer_lora_layers=layers)
    return paths


def build_pipeline(name: str, device="cuda") -> CogVideoXPipeline:
    """A full-size random-weight `name` ("2b" or "5b") pipeline in bf16 on `device`, in memory
    (under a second on a GPU). "tiny" builds the tiny transformer with a small T5 and VAE, to try a
    benchmark on the CPU."""
    from transformers import T5Config, T5EncoderModel

    from workers.tiny_model import _tokenizer

    dtype = torch.bfloat16 if name != "tiny" else torch.float32
    t5 = T5_XXL if name != "tiny" else {**T5_XXL, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}
    vae_config = {} if name != "tiny" else {"block_out_channels": (8, 8, 8, 8), "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 2, "temporal_compression_ratio": 4}  # fmt: skip
    with torch.device(device):
        torch.manual_seed(1)
        text_encoder = T5EncoderModel(T5Config(**t5)).to(dtype).eval()  # eval: no dropout, as from_pretrained gives
        torch.manual_seed(2)
        vae = AutoencoderKLCogVideoX(**vae_config).to(dtype).eval()
    transformer = build_transformer(name, device, dtype)
    scheduler = (CogVideoXDPMScheduler if name == "5b" else CogVideoXDDIMScheduler)(timestep_spacing="trailing")
    return CogVideoXPipeline(
        tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def write_pipeline(folder: str, name: str, device="cuda", rank: int = 64) -> dict[str, str]:
    """Write a full-size random-weight `name` ("2b" or "5b") pipeline to FOLDER/model (bf16) and two
    rank-`rank` adapters to FOLDER/adapters/{a1,a2}; returns their paths, as `write_tiny_model` does.
    Built on `device` (under a second on a GPU); saving 2B takes about 15 s, 5B 26 s."""
    pipe = build_pipeline(name, device)
    model_dir = os.path.join(folder, "model")
    pipe.save_pretrained(model_dir)
    transformer = pipe.transformer
    paths = {"model": model_dir, **write_adapters(transformer, rank, os.path.join(folder, "adapters"), transformer.dtype)}
    del pipe, transformer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return paths


def pipeline_paths(folder: str) -> dict[str, str]:
    """Where `write_pipeline` puts the model and its two adapters under FOLDER."""
    return {"model": os.path.join(folder, "model")} | {
        name: os.path.join(folder, "adapters", name) for name in ("a1", "a2")
    }


def ensure_pipeline(folder: str, name: str) -> dict[str, str]:
    """The paths of a full-size random `name` pipeline in FOLDER, written there first if absent."""
    if not os.path.isdir(os.path.join(folder, "model")):
        started = time.perf_counter()
        write_pipeline(folder, name, "cuda")
        print(f"wrote a full-size random {name} pipeline in {time.perf_counter() - started:.0f}s", flush=True)
    return pipeline_paths(folder)
