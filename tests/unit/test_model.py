"""The model's layer table (what adapters may target, read from configs without torch on the
producer) against the real module tree of every supported CogVideoX kind, built tiny."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from common.model import cogvideox_linear_layers

pytestmark = pytest.mark.unit

TINY = dict(
    num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
    text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=16,
)  # fmt: skip
KINDS = {
    "2b (sin-cos positions)": {},
    "5b (rotary)": {"use_rotary_positional_embeddings": True},
    "5b-i2v (image latents beside the noise)": {
        "in_channels": 8, "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True,
    },
    "1.5 (temporal patches, ofs embedding)": {
        "patch_size_t": 2, "ofs_embed_dim": 2, "use_rotary_positional_embeddings": True, "patch_bias": False,
    },
    "1.5-i2v": {
        "in_channels": 8, "patch_size_t": 2, "ofs_embed_dim": 2, "use_rotary_positional_embeddings": True,
        "patch_bias": False,
    },
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_layer_table_is_the_module_tree(kind):
    config = {**TINY, **KINDS[kind]}
    model = CogVideoXTransformer3DModel(**config)
    real = {
        name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert cogvideox_linear_layers(dict(model.config)) == real


def test_the_committed_tiny_config_is_the_tiny_model_tiny_model_builds(tiny):
    """tests/tiny_config holds the tiny model's config files, for the torch-free tests that check
    jobs against it (tests/unit/test_corpus.py): what model_info reads of it stays what it reads of
    the model `lorafleet tiny-model` writes."""
    import dataclasses
    import os

    from common.model import model_info
    from tests.conftest import REPO

    committed = model_info(os.path.join(REPO, "tests", "tiny_config"))
    assert dataclasses.replace(committed, ref=tiny["model"]) == model_info(tiny["model"])


def test_the_tiny_transformers_training_gives_the_same_weights_from_the_same_seed(monkeypatch):
    """write_tiny_model's promise (the same seed, the same files) holds through `train_still`, here
    for a few of its steps: the weights move, and move the same way twice."""
    from workers import tiny_model

    monkeypatch.setitem(tiny_model.STILL_TRAINING, "steps", 8)
    untrained = tiny_model.build_pipeline(0).transformer.state_dict()
    trained = []
    for _ in range(2):
        pipe = tiny_model.build_pipeline(0)
        tiny_model.train_still(pipe, 0)
        trained.append(pipe.transformer.state_dict())
    assert all(torch.equal(trained[0][name], trained[1][name]) for name in untrained)
    assert not all(torch.equal(trained[0][name], untrained[name]) for name in untrained)
