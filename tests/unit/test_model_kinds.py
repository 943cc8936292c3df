"""Image-to-video and CogVideoX 1.5 on their tiny models: the `image` field (checked at submit, its
content in the key), and renders that equal diffusers' own pipelines with its LoRA loading."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from common.errors import JobFileError
from common.images import decode
from common.jobs_file import load_jobs
from common.model import model_info
from common.settings import Settings
from tests.helpers import default_limits, default_policy, prepare_job, resolver_for
from workers.renderer import Renderer

pytestmark = pytest.mark.unit
STEPS = 4


def keys(tmp_path, model: str, lines: list[dict]) -> list[str]:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "a cat", "seed": 1, **line}) + "\n" for line in lines))
    return [job.key for job in load_jobs(str(path), lambda alias: model_info(model), resolver_for(), default_limits())]


def submit_errors(tmp_path, model: str, lines: list[dict]) -> list[str]:
    with pytest.raises(JobFileError) as caught:
        keys(tmp_path, model, lines)
    return caught.value.errors


def test_the_key_follows_the_image_content_not_its_path(tiny_kinds, tmp_path):
    i2v = tiny_kinds["i2v"]
    moved = str(tmp_path / "elsewhere.png")
    shutil.copy(i2v["sunset"], moved)
    changed = str(tmp_path / "changed.png")
    pixels = np.asarray(Image.open(i2v["sunset"])).copy()
    pixels[0, 0, 0] ^= 1  # one bit of one pixel
    Image.fromarray(pixels).save(changed)
    sunset, same, one_bit, tiles = keys(
        tmp_path,
        i2v["model"],
        [{"image": i2v["sunset"]}, {"image": {"uri": moved}}, {"image": changed}, {"image": i2v["tiles"]}],
    )
    assert sunset == same
    assert len({sunset, one_bit, tiles}) == 3


def test_image_errors_name_the_line_and_field(tiny, tiny_kinds, tmp_path):
    i2v = tiny_kinds["i2v"]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    fifo = str(tmp_path / "fifo.png")
    os.mkfifo(fifo)
    errors = submit_errors(
        tmp_path,
        i2v["model"],
        [
            {},
            {"image": str(tmp_path / "missing.png")},
            {"image": str(not_an_image)},
            {"image": fifo},
            {"image": 7},
            {"image": {"uri": i2v["sunset"], "uri_": "x"}},
            {"image": i2v["sunset"], "height": 32},
        ],
    )
    assert errors[0] == "line 1: image: required: this model turns an image into a video"
    assert errors[1].startswith(f'line 2: image "{tmp_path}/missing.png" not found (checked ')
    assert (
        errors[2]
        == f"line 3: image {not_an_image} does not decode as a PNG, JPEG or WebP image (UnidentifiedImageError)"
    )
    assert errors[3].startswith("line 4: image ") and "not a regular file" in errors[3]
    assert errors[4] == 'line 5: image: must be a URI string or {"uri": ...}'
    assert errors[5] == 'line 6: image: unknown field "uri_" (did you mean "uri"?)'
    assert errors[6] == "line 7: height: must be 16: this model renders only at its own size, got 32"
    assert len(errors) == 7
    (t2v,) = submit_errors(tmp_path, tiny["model"], [{"image": i2v["sunset"]}])
    assert t2v == "line 1: image: this model is text-to-video and takes no image (name an image-to-video model)"


def test_the_1_5_models_take_16n_plus_1_frames(tiny_kinds, tmp_path):
    (error,) = submit_errors(tmp_path, tiny_kinds["t2v-1.5"]["model"], [{"num_frames": 9}])
    assert error == "line 1: num_frames: must be 16·N+1 for this model (e.g. 17), got 9"
    assert len(keys(tmp_path, tiny_kinds["t2v-1.5"]["model"], [{"num_frames": 33}])) == 1


@pytest.fixture(scope="module")
def renderers(tiny_kinds, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("adapter-cache"))
    settings = Settings(adapter_cache_dir=cache)
    return {kind: Renderer(paths["model"], "cpu", settings, kind) for kind, paths in tiny_kinds.items()}


def render(renderer, **fields) -> np.ndarray:
    (job,) = prepare_job(
        {"prompt": "a cat", "seed": 3, "steps": STEPS, **fields}, "test", renderer.info, resolver_for()
    )
    return np.stack(renderer.render(job)[0])


def diffusers_render(paths: dict, adapters: list[str], image: str | None) -> np.ndarray:
    """The same job through diffusers' own pipeline: `load_lora_weights` and `fuse_lora`, as its docs show."""
    pipe = DiffusionPipeline.from_pretrained(paths["model"])
    pipe.set_progress_bar_config(disable=True)
    for i, adapter in enumerate(adapters):
        pipe.load_lora_weights(adapter, adapter_name=f"a{i}")
    if adapters:
        pipe.set_adapters([f"a{i}" for i in range(len(adapters))])
        pipe.fuse_lora()
    extra = {} if image is None else {"image": decode(image, open(image, "rb").read())}
    info = model_info(paths["model"])
    return pipe(
        prompt="a cat", num_frames=info.num_frames, height=16, width=16, num_inference_steps=STEPS, max_sequence_length=16,
        generator=torch.Generator("cpu").manual_seed(3), output_type="np", **extra,
    ).frames[0]  # fmt: skip


@pytest.mark.parametrize("kind", ["i2v", "t2v-1.5", "i2v-1.5"])
def test_each_kind_renders_what_diffusers_does_base_and_fused(kind, tiny_kinds, renderers):
    paths, renderer = tiny_kinds[kind], renderers[kind]
    image = paths.get("sunset")
    fields = {} if image is None else {"image": image}
    base = render(renderer, **fields)
    assert base.shape == (renderer.info.num_frames, 16, 16, 3)
    assert np.array_equal(base, diffusers_render(paths, [], image))  # the same call, bit for bit
    both = [paths["style"], paths["subject"]]
    fused = render(renderer, adapters=both, **fields)
    np.testing.assert_allclose(fused, diffusers_render(paths, both, image), atol=2e-3)
    assert not np.allclose(fused, base, atol=1e-3)
    if image is not None:  # the image decides the video
        assert not np.allclose(render(renderer, image=paths["tiles"]), base, atol=1e-3)


def test_a_worker_refuses_an_image_changed_since_submit(tiny_kinds, tmp_path):
    from common.errors import ImageError
    from common.images import read_image, read_image_url

    path = str(tmp_path / "input.png")
    shutil.copy(tiny_kinds["i2v"]["sunset"], path)
    found, _ = read_image(path, default_policy())
    assert read_image_url(found.url, found.sha256, default_policy()).size == (16, 16)
    shutil.copy(tiny_kinds["i2v"]["tiles"], path)
    with pytest.raises(
        ImageError, match=rf"^image {path} changed since it was submitted \(sha256 [0-9a-f]{{12}}, job wants "
    ):
        read_image_url(found.url, found.sha256, default_policy())
    outside = default_policy(roots=(str(tmp_path / "elsewhere"),))
    with pytest.raises(ImageError, match=r"^image .* is outside the allowed locations"):
        read_image_url(found.url, found.sha256, outside)
