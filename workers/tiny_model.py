"""A tiny CogVideoX pipeline and two adapters, for the demo and the tests.

Built from configs (the sizes diffusers' own CogVideoX LoRA tests use) and saved with
`save_pretrained`, so it is loaded through `from_pretrained` exactly like a real model.
Random weights, but for one thing the text-to-video transformer is taught (`train_still`): its
videos hold still, as a real model's are steady, so that an adapter's effect on steadiness shows.
Built deterministically from a seed: the same seed gives the same files, bit for bit.
"""

import io
import json
import os

import sentencepiece
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDPMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

SENTENCES = [
    "a cat walks along the beach at sunset",
    "a red car drives through a city at night",
    "waves crash against dark rocks",
    "a dog runs across a green field",
    "snow falls on a quiet pine forest",
    "the camera pans slowly across the mountains",
    "a paper boat floats down a stream",
    "neon lights flicker in the rain",
]
TEXT_TOKENS = 16
ADAPTERS = {
    # name: (rank, alpha written into the file's metadata or None, targeted attention projections)
    "style": (4, None, ["to_q", "to_k", "to_v", "to_out.0"]),
    "subject": (2, 1.0, ["to_q", "to_v"]),
}


def _tokenizer() -> T5Tokenizer:
    """A T5 tokenizer from a SentencePiece model trained on a few sentences."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4),
        model_writer=model,
        vocab_size=48,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


# Rotary positions (5B and later) split a head into 3 even parts: heads of 16 channels (2 × 16 = 4 × 8).
ROTARY = {"use_rotary_positional_embeddings": True, "num_attention_heads": 2, "attention_head_dim": 16}
# The CogVideoX kinds, as their transformers differ from the 1.0 text-to-video model's (DOMAIN.md).
KINDS = {
    "t2v": {},
    # CogVideoX-5B-I2V: the image's latents beside the noise, learned positions (only its own size)
    "i2v": {"in_channels": 8, **ROTARY, "use_learned_positional_embeddings": True},
    # CogVideoX 1.5: patches of 2 latent frames (16N+1 frames), a linear patch embedding
    "t2v-1.5": {"patch_size_t": 2, **ROTARY, "patch_bias": False, "sample_frames": 17},
    # CogVideoX1.5-5B-I2V: and its ofs embedding
    "i2v-1.5": {
        "in_channels": 8, "patch_size_t": 2, "ofs_embed_dim": 2, **ROTARY,
        "patch_bias": False, "sample_frames": 17,
    },
}  # fmt: skip


def build_pipeline(seed: int = 0, kind: str = "t2v") -> CogVideoXPipeline | CogVideoXImageToVideoPipeline:
    """The tiny random-weight CogVideoX pipeline of a kind (KINDS), in fp32 on the CPU (untrained)."""
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(seed + 1)
    config = dict(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,  # latent size: 16×16 pixels by default
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_TOKENS,
    )
    transformer = CogVideoXTransformer3DModel(**(config | KINDS[kind]))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDPMScheduler(timestep_spacing="trailing")
    pipeline = CogVideoXImageToVideoPipeline if kind.startswith("i2v") else CogVideoXPipeline
    return pipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


# A random transformer's videos flicker frame to frame (temporal SSIM about 0.34 at 32×32), so no
# sweep on it could tell a steady scale from an unsteady one. Trained on latent clips whose frames
# are one random pattern (the scheduler's own noise levels, epsilon-prediction), its frames keep a
# temporal SSIM of about 0.99 (0.94 through a 32×32 H.264 MP4), and an adapter's flicker grows with
# its scale as a real one's does. 3000 steps take about 19 s on one CPU core.
STILL_TRAINING = {"steps": 3000, "batch": 32, "learning_rate": 3e-3}
# (latent frames, height, width) of the sizes the demo and the tests render: 9 and 5 frames, 32 and 16 pixels
STILL_SHAPES = [(3, 4, 4), (3, 2, 2), (2, 4, 4), (2, 2, 2)]


def train_still(pipe: CogVideoXPipeline, seed: int) -> None:
    """Teach the pipeline's transformer to render still videos (STILL_TRAINING), whatever the prompt."""
    transformer, alphas = pipe.transformer, pipe.scheduler.alphas_cumprod.float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same files whatever the cores: no reduction order that depends on them
    try:
        tokens = pipe.tokenizer(
            [*SENTENCES, ""], padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            texts = pipe.text_encoder.eval()(tokens.input_ids)[0]
        generator = torch.Generator().manual_seed(seed + 4)
        steps, batch = STILL_TRAINING["steps"], STILL_TRAINING["batch"]
        optimizer = torch.optim.AdamW(transformer.parameters(), lr=STILL_TRAINING["learning_rate"], weight_decay=0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, STILL_TRAINING["learning_rate"], total_steps=steps)
        transformer.train()
        for step in range(steps):
            frames, height, width = STILL_SHAPES[step % len(STILL_SHAPES)]
            still = torch.randn(batch, 1, 4, height, width, generator=generator).expand(-1, frames, -1, -1, -1)
            noise = torch.randn(batch, frames, 4, height, width, generator=generator)
            timesteps = torch.randint(0, len(alphas), (batch,), generator=generator)
            alpha = alphas[timesteps].view(batch, 1, 1, 1, 1)
            noisy = alpha.sqrt() * still + (1 - alpha).sqrt() * noise
            text = texts[torch.randint(0, len(texts), (batch,), generator=generator)]
            predicted = transformer(
                hidden_states=noisy, encoder_hidden_states=text, timestep=timesteps, return_dict=False
            )[0]
            loss = torch.nn.functional.mse_loss(predicted, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        transformer.eval()
    finally:
        torch.set_num_threads(threads)


def adapter_layers(transformer, rank: int, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA A/B matrices for the given projections of every block's attention."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for index, _ in enumerate(transformer.transformer_blocks):
        for target in targets:
            name = f"transformer_blocks.{index}.attn1.{target}"
            linear = transformer.get_submodule(name)
            shape_a, shape_b = (rank, linear.in_features), (linear.out_features, rank)
            layers[f"{name}.lora_A.weight"] = torch.randn(shape_a, generator=generator) * 0.3
            layers[f"{name}.lora_B.weight"] = torch.randn(shape_b, generator=generator) * 0.3
    return layers


def write_tiny_clip(directory: str, seed: int = 0) -> str:
    """A tiny random-weight CLIP (what `LORAFLEET_EVAL_CLIP` names) in DIR, with a BPE tokenizer whose
    vocabulary is the letters (no merges: a word is its letters), for `CLIPModel`/`CLIPProcessor`'s
    `from_pretrained`; returns DIR."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n")
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(vocab), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed + 3)
    CLIPModel(config).save_pretrained(directory)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=CLIPTokenizer(vocab_file, merges_file)).save_pretrained(directory)
    return directory


def write_images(directory: str, size: int = 16) -> dict[str, str]:
    """Two input images for image-to-video jobs: a warm gradient and a cool checkerboard (PNG)."""
    import numpy as np
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    gradient = np.stack([np.add.outer(ramp, ramp) / 2, ramp[:, None].repeat(size, 1), np.full((size, size), 40.0)], -1)
    checks = (np.add.outer(np.arange(size) // 4, np.arange(size) // 4) % 2) * 200.0
    checker = np.stack([checks * 0.2, checks * 0.6, checks + 40], -1)
    paths = {}
    for name, pixels in (("sunset", gradient), ("tiles", checker)):
        paths[name] = os.path.join(directory, f"{name}.png")
        Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(paths[name])
    return paths


def write_tiny_model(directory: str, seed: int = 0, kind: str = "t2v") -> dict[str, str]:
    """Write the pipeline of a kind (KINDS) to DIR/model, the adapters to DIR/adapters/<name>, a tiny
    CLIP for evaluations to DIR/clip and, for image-to-video kinds, two input images to
    DIR/images/{sunset,tiles}.png; returns their paths."""
    pipe = build_pipeline(seed, kind)
    if kind == "t2v":
        train_still(pipe, seed)
    model_dir = os.path.join(directory, "model")
    pipe.save_pretrained(model_dir)
    paths = {"model": model_dir, "clip": write_tiny_clip(os.path.join(directory, "clip"), seed)}
    for offset, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items(), start=1):
        adapter_dir = os.path.join(directory, "adapters", name)
        metadata = None
        if alpha is not None:
            metadata = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
        type(pipe).save_lora_weights(  # each pipeline class writes its own LoRA files (the same layout)
            adapter_dir,
            transformer_lora_layers=adapter_layers(pipe.transformer, rank, targets, seed + 100 * offset),
            transformer_lora_adapter_metadata=metadata,
        )
        paths[name] = adapter_dir
    if kind.startswith("i2v"):
        paths |= write_images(os.path.join(directory, "images"))
    readable_as_umask_allows(directory)
    return paths


def readable_as_umask_allows(directory: str) -> None:
    """Give every file under `directory` the mode the umask allows (0644 under the usual 022):
    transformers writes its weights 0600 (a temporary file moved into place), and a worker of
    another uid (10001, the images' user) could not read a tiny model built by root."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, names in os.walk(directory):
        for name in names:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
