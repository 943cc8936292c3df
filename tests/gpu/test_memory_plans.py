"""Every memory plan renders the frames the resident one does, on a real GPU: offloading moves
tensors between host and device and never changes the math, and variant switching stays exact
when the transformer's weights live on the host. Skipped without CUDA; run on the device machine
(see tests/gpu/test_fleet_on_gpu.py)."""

import numpy as np
import pytest
import torch

from common.settings import Settings
from tests.gpu.conftest import needs_gpu
from tests.helpers import prepare_job, resolver_for
from workers.memory import PLAN_NAMES
from workers.renderer import Renderer

pytestmark = [
    pytest.mark.gpu,
    needs_gpu(),
]


def renders(tiny, tmp_path, plan: str) -> tuple[list[np.ndarray], Renderer]:
    settings = Settings(adapter_cache_dir=str(tmp_path / plan), memory_plan=plan)
    renderer = Renderer(tiny["model"], "cuda", settings, plan)
    jobs = [
        {"prompt": "a cat", "seed": 1},
        {"prompt": "a cat", "seed": 1, "adapters": [tiny["style"]]},
        {"prompt": "a dog", "seed": 2, "adapters": [tiny["style"], {"uri": tiny["subject"], "weight": 0.5}]},
        {"prompt": "a cat", "seed": 1, "adapters": [tiny["style"]]},  # back to a variant seen before
        {"prompt": "a cat", "seed": 1},
    ]
    out = []
    for job in jobs:
        (finished,) = prepare_job(
            {**job, "steps": 4, "height": 32, "width": 32}, "gpu", renderer.info, resolver_for()
        )
        out.append(np.stack(renderer.render(finished)[0]))
    return out, renderer


def test_every_plan_renders_the_resident_frames_bit_for_bit(tiny, tmp_path):
    resident, renderer = renders(tiny, tmp_path, "resident")
    assert renderer.pipe.text_encoder.device.type == "cuda"
    assert np.array_equal(resident[0], resident[4]) and np.array_equal(resident[1], resident[3])
    assert not np.array_equal(resident[0], resident[1])
    del renderer
    for plan in PLAN_NAMES[1:]:
        frames, renderer = renders(tiny, tmp_path, plan)
        assert renderer.plan.name == plan
        for i, (ours, theirs) in enumerate(zip(frames, resident, strict=True)):
            assert np.array_equal(ours, theirs), f"{plan}: job {i} differs from the resident render"
        if plan == "model-offload":  # between jobs the transformer waits on the host
            assert next(renderer.pipe.transformer.parameters()).device.type == "cpu"
        del renderer
        torch.cuda.empty_cache()
