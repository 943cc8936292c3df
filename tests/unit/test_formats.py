"""Every LoRA format users bring loads to the same weights as its diffusers-format twin; bad files say why."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.adapters import WEIGHTS_NAME
from common.errors import JobError
from common.settings import Settings
from tests.helpers import prepare_job, resolver_for
from workers.renderer import Renderer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def renderer(tiny, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("adapter-cache"))
    return Renderer(tiny["model"], "cpu", Settings(adapter_cache_dir=cache), "test")


def job(renderer, adapters, **fields) -> dict:
    base = {"prompt": "waves crash against dark rocks", "seed": 3, "steps": 6, "adapters": adapters, **fields}
    (finished,) = prepare_job(base, "line 1", renderer.info, resolver_for())
    return finished


def fused_weights(renderer, adapters, **fields) -> dict:
    renderer.render(job(renderer, adapters, steps=1, **fields))
    return {name: module.weight.detach().clone() for name, module in renderer.variants.linears.items()}


def diffusers_layers(path: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix("transformer."): v for k, v in load_file(os.path.join(path, WEIGHTS_NAME)).items()}


def write(folder, name: str, tensors: dict, metadata=None, config=None) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, name), metadata=metadata)
    if config is not None:
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f)
    return str(folder)


def twins(tiny, tmp_path) -> dict[str, tuple[str, float | None]]:
    """`style` (rank 4, no alpha) in every format, each declaring alpha 2 its own way; the job
    alpha each twin needs in diffusers' format to mean the same."""
    layers = diffusers_layers(tiny["style"])
    peft = {f"base_model.model.{k}": v for k, v in layers.items()}
    kohya, sat = {}, {}
    for key, tensor in layers.items():
        module, _, role = key.rpartition(".lora_")
        flat = "lora_unet_" + module.replace(".", "_")
        kohya[f"{flat}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = tensor
        kohya[f"{flat}.alpha"] = torch.tensor(2.0)
        block, target = module.split(".attn1.")
        index = block.split(".")[1]
        sat_target = {"to_q": "query_key_value.matrix_{}.0", "to_k": "query_key_value.matrix_{}.1",
                      "to_v": "query_key_value.matrix_{}.2", "to_out.0": "dense.matrix_{}.0"}[target]  # fmt: skip
        sat[f"model.diffusion_model.transformer.layers.{index}.attention.{sat_target.format(role[0])}"] = tensor
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2})}
    return {
        "peft + config": (
            write(tmp_path / "peft", "adapter_model.safetensors", peft, config={"r": 4, "lora_alpha": 2}),
            None,
        ),
        "kohya": (write(tmp_path / "kohya", "k.safetensors", kohya) + "/k.safetensors", None),
        "metadata": (
            write(tmp_path / "meta", WEIGHTS_NAME, {f"transformer.{k}": v for k, v in layers.items()}, metadata),
            None,
        ),
        "sat (no alpha)": (write(tmp_path / "sat", "sat.safetensors", sat) + "/sat.safetensors", 4.0),
    }


def test_every_format_fuses_to_the_weights_of_its_diffusers_twin(renderer, tiny, tmp_path):
    # A diffusers-format file with alpha 2 given in the job: the reference.
    expected = fused_weights(renderer, [{"uri": tiny["style"], "alpha": 2.0}])
    base = fused_weights(renderer, [])
    for fmt, (uri, alpha_for_sat) in twins(tiny, tmp_path).items():
        adapters = [{"uri": uri, "alpha": 2.0}] if alpha_for_sat else [uri]
        got = fused_weights(renderer, adapters)
        changed = [n for n in got if not torch.equal(got[n], base[n])]
        assert len(changed) == 4, fmt  # to_q, to_k, to_v, to_out.0 of the one block
        assert all(torch.equal(got[n], expected[n]) for n in got), fmt


def test_every_format_fuses_exactly_on_the_1_5_image_to_video_model(tiny_kinds, tmp_path):
    paths = tiny_kinds["i2v-1.5"]  # its adapters were written by CogVideoXImageToVideoPipeline.save_lora_weights
    i2v = Renderer(paths["model"], "cpu", Settings(adapter_cache_dir=str(tmp_path / "cache")), "i2v")
    image = {"image": paths["sunset"]}
    expected = fused_weights(i2v, [{"uri": paths["style"], "alpha": 2.0}], **image)
    base = fused_weights(i2v, [], **image)
    for fmt, (uri, alpha_for_sat) in twins(paths, tmp_path).items():
        got = fused_weights(i2v, [{"uri": uri, "alpha": 2.0}] if alpha_for_sat else [uri], **image)
        assert sum(not torch.equal(got[n], base[n]) for n in got) == 4, fmt
        assert all(torch.equal(got[n], expected[n]) for n in got), fmt


def test_job_alpha_overrides_the_file(renderer, tiny):
    # subject: rank 2, alpha 1 in its metadata. alpha 2 at weight 1 means what weight 2 means at alpha 1.
    a = np.stack(renderer.render(job(renderer, [{"uri": tiny["subject"], "alpha": 2.0}]))[0])
    b = np.stack(renderer.render(job(renderer, [{"uri": tiny["subject"], "weight": 2.0}]))[0])
    c = np.stack(renderer.render(job(renderer, [tiny["subject"]]))[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def bad_file(tmp_path, name: str, tensors: dict) -> str:
    return write(tmp_path / name, "bad.safetensors", tensors) + "/bad.safetensors"


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {"transformer.nowhere.lora_A.weight": torch.ones(2, 32), "transformer.nowhere.lora_B.weight": torch.ones(32, 2),
             "transformer.also_not.lora_A.weight": torch.ones(2, 32), "transformer.also_not.lora_B.weight": torch.ones(32, 2)},
            "2 module(s) match no linear layer of the model, e.g. also_not, nowhere",
        ),
        (
            {"transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.ones(2, 16),
             "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.ones(32, 2)},
            "transformer_blocks.0.attn1.to_k is 32×32 in the model but 32×16 in the adapter",
        ),
        (
            {"transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.ones(2, 32),
             "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.ones(32, 3)},
            "lora_A (2, 32) and lora_B (32, 3) have different ranks",
        ),
        (
            {"transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.ones(2, 32)},
            "transformer_blocks.0.attn1.to_k has only lora_A, not both",
        ),
        ({"weird_key": torch.ones(2)}, "1 key(s) of a diffusers-format LoRA match no module, e.g. weird_key"),
    ],
)  # fmt: skip
def test_bad_adapters_are_refused_at_submit_with_their_reason(renderer, tmp_path, tensors, message):
    path = bad_file(tmp_path, "bad", tensors)
    with pytest.raises(JobError) as raised:
        job(renderer, [path])
    assert message in str(raised.value) and str(raised.value).startswith(f'line 1: adapter "{path}"')


@pytest.mark.parametrize(
    "content, message", [(b"", "not a safetensors file"), (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "holds no tensors")]
)
def test_empty_and_non_safetensors_files_are_refused(renderer, tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(JobError, match=message):
        job(renderer, [str(path)])
