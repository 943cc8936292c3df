"""The fleet on a real GPU: a worker pinned with --gpu 0 renders bf16 jobs through Redis, and the
variant engine stays exact there. Skipped without CUDA; run on the device machine:
`source benchmarks/device_setup.sh && python3 -m pytest tests/gpu -p no:cacheprovider`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.gpu.conftest import needs_gpu
from tests.helpers import decode_video, default_policy, read_manifest, render_records
from workers.supervisor import spawn_worker, stop_worker, wait_until_ready

pytestmark = [
    pytest.mark.gpu,
    needs_gpu(),
]


def test_a_gpu_worker_renders_a_batch_in_bf16(fleet_env, tiny, tmp_path):
    log_path = str(tmp_path / "gpu0.log")
    worker = spawn_worker(["--gpu", "0"], fleet_env, log_path)
    try:
        wait_until_ready(worker, log_path, timeout_s=300)
        jobs = tmp_path / "jobs.jsonl"
        lines = [
            {"id": "base", "prompt": "a cat", "seed": 1, "height": 32, "width": 32},
            {"id": "style", "prompt": "a cat", "seed": 1, "adapters": [tiny["style"]], "height": 32, "width": 32},
            {
                "id": "both",
                "prompt": "a dog",
                "seed": 2,
                "adapters": [tiny["style"], {"uri": tiny["subject"], "weight": 0.5}],
                "lora_scale": [0.5, 1.0],
                "height": 32,
                "width": 32,
            },
        ]
        jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
        submit = subprocess.run(
            [sys.executable, "-m", "lorafleet", "submit", str(jobs), "--wait", "--batch", "gpu", "--timeout", "300"],
            env=fleet_env,
            capture_output=True,
            text=True,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        manifest = read_manifest(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "gpu", "manifest.jsonl"))
        assert [entry["status"] for entry in manifest] == ["done"] * 4
        for entry in manifest:
            assert decode_video(entry["video"]).shape == (9, 32, 32, 3)
            with open(entry["metadata"]) as f:
                metadata = json.load(f)
            assert metadata["dtype"] == "bfloat16" and "cpu" not in metadata["device"], metadata["device"]
        assert len(render_records([log_path])) == 4
    finally:
        stop_worker(worker)


def test_variants_are_exact_on_the_gpu(tiny):
    """1,000 random switches in bf16 on the GPU, then the base and one variant: bit for bit."""
    from diffusers import CogVideoXTransformer3DModel

    from common.adapters import read_adapter
    from workers.adapter_cache import AdapterCache, AdapterFiles
    from workers.variants import VariantEngine

    model = CogVideoXTransformer3DModel.from_pretrained(
        os.path.join(tiny["model"], "transformer"), dtype=torch.bfloat16
    ).to("cuda")
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine = VariantEngine(model, 2**30)
    cache = AdapterCache(
        AdapterFiles(os.path.join(os.path.dirname(tiny["model"]), "cache"), 2**30, default_policy()), 2**30,
        engine.layer_sizes(),
    )
    adapters = {name: cache.get(*_url_and_hash(tiny[name], read_adapter)) for name in ("style", "subject")}

    def variant(i: int):
        scale = 0.25 * (i % 8)
        terms = [(adapters["style"], 1.0, None)] + ([(adapters["subject"], 0.7, None)] if i % 2 else [])
        return terms, scale, (i % 2, scale)

    engine.apply(*variant(3))
    first = {name: p.detach().clone() for name, p in model.named_parameters()}
    for i in range(1000):
        engine.apply(*variant(i))
    engine.apply([], 0.0, ())
    assert all(torch.equal(p, base[name]) for name, p in model.named_parameters())
    engine.apply(*variant(3))
    assert all(torch.equal(p, first[name]) for name, p in model.named_parameters())


def _url_and_hash(folder: str, read_adapter) -> tuple[str, str]:
    found, _ = read_adapter(folder, default_policy())
    return found.url, found.sha256
