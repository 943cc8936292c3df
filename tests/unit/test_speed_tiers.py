"""Speed tiers on the CPU: model aliases name their precision and compile mode, precision is part
of the job key and compiling is not, fp8's per-row quantization of stacked layers is torchao's
own, and compile artifacts shared through the store spare a fresh worker the compile."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import JobError, ModelError
from common.job import job_key
from common.model import model_info
from common.settings import ModelTier, Settings, settings_env
from tests.helpers import prepare_job, resolver_for
from workers.compile_cache import CompileCache, cache_key, identity

pytestmark = pytest.mark.unit


def test_a_model_alias_names_its_precision_and_compile_mode(monkeypatch):
    models = {"2b": "/models/2b", "5b-fast": {"ref": "/models/5b", "precision": "fp8", "compile": True}}
    monkeypatch.setenv("LORAFLEET_MODELS", json.dumps(models))
    monkeypatch.setenv("LORAFLEET_COMPILE", "true")
    settings = Settings()
    assert settings.model_tier("5b-fast") == ModelTier(ref="/models/5b", precision="fp8", compile=True)
    assert settings.model_tier("2b") == ModelTier(ref="/models/2b", precision="bf16", compile=True)  # the fleet's
    assert settings.model_tier(None).ref == settings.model and settings.model_tier(None).precision == "bf16"
    assert settings.model_tier("5b-fast").ref == "/models/5b"
    # A supervisor's workers see the same tiers.
    assert json.loads(settings_env(settings)["LORAFLEET_MODELS"])["5b-fast"]["precision"] == "fp8"
    with pytest.raises(ModelError, match='unknown model alias "5b-slow"'):
        settings.model_tier("5b-slow")


@pytest.mark.parametrize(
    "tier", [{"ref": "/m", "precision": "fp4"}, {"ref": "/m", "compiled": True}, {"precision": "fp8"}]
)
def test_a_bad_tier_is_refused_when_the_settings_are_read(monkeypatch, tier):
    monkeypatch.setenv("LORAFLEET_MODELS", json.dumps({"x": tier}))
    with pytest.raises(ValueError, match="models"):
        Settings()


def test_precision_is_in_the_job_key_and_compiling_is_not(tiny):
    """bf16 keys stay as they were before tiers (test_model_kinds pins one); fp8 renders get their own."""
    job = {"prompt": "a cat", "seed": 1, "adapters": [tiny["style"]]}
    bf16, fp8 = model_info(tiny["model"]), model_info(tiny["model"], "fp8")
    (plain,) = prepare_job(job, "line 1", bf16, resolver_for())
    (quantized,) = prepare_job(job, "line 1", fp8, resolver_for())
    assert plain.key != quantized.key
    assert job_key(plain, replace(bf16, precision="fp8")) == quantized.key
    with pytest.raises(JobError, match="line 1: fuse: must be true on an fp8 model"):
        prepare_job({**job, "fuse": False}, "line 1", fp8, resolver_for())


def test_fp8_worker_refuses_a_device_without_fp8_units(tiny, tmp_path):
    from workers.renderer import Renderer

    with pytest.raises(ModelError, match="precision fp8 needs a CUDA GPU"):
        Renderer(tiny["model"], "cpu", Settings(adapter_cache_dir=str(tmp_path)), "x", "fp8")


def test_stacked_fp8_quantization_is_torchaos_layer_by_layer():
    """The variant engine quantizes a whole group of layers at once; torchao quantized the model
    one layer at a time: the bits must be the same (per-row scales do not mix layers)."""
    from torchao.quantization import Float8Tensor, PerRow

    from workers import fp8

    generator = torch.Generator().manual_seed(0)
    stack = (torch.randn(40, 32, 64, generator=generator) * torch.rand(40, 32, 1, generator=generator)).bfloat16()
    like = Float8Tensor.from_hp(stack[0], granularity=PerRow())
    data, scales = fp8.encode(stack, like)  # 40 layers: three chunks
    for i in range(len(stack)):
        one = Float8Tensor.from_hp(stack[i], granularity=PerRow())
        assert torch.equal(data[i].view(torch.uint8), one.qdata.view(torch.uint8))
        assert torch.equal(scales[i], one.scale)
    layers = [Float8Tensor.from_hp(torch.zeros(32, 64, dtype=torch.bfloat16), granularity=PerRow()) for _ in stack]
    fp8.write(layers, (data, scales))
    assert all(torch.equal(layer.dequantize(), Float8Tensor.from_hp(w, granularity=PerRow()).dequantize())
               for layer, w in zip(layers, stack, strict=True))  # fmt: skip


def test_the_compile_cache_key_covers_what_compiled_code_depends_on():
    config = {"num_layers": 42, "attention_head_dim": 64, "_diffusers_version": "0.42.1"}
    base = identity(config, "bf16", (49, 480, 720), "inductor", "blocks", "cpu")
    assert base["torch"] == torch.__version__.split("+")[0] or base["torch"].startswith(torch.__version__[:4])
    for changed in (
        identity({**config, "num_layers": 30}, "bf16", (49, 480, 720), "inductor", "blocks", "cpu"),
        identity(config, "fp8", (49, 480, 720), "inductor", "blocks", "cpu"),
        identity(config, "bf16", (81, 768, 1360), "inductor", "blocks", "cpu"),
        identity(config, "bf16", (49, 480, 720), "aot_eager", "blocks", "cpu"),
        identity(config, "bf16", (49, 480, 720), "inductor", "whole", "cpu"),
        {**base, "gpu_arch": "sm_90"},
        {**base, "torch": "2.99.0"},
    ):
        assert cache_key(changed) != cache_key(base)
    # Not the weights, nor where the config was saved from: a fine-tune shares its base's artifacts.
    assert cache_key(
        identity({**config, "_diffusers_version": "0.30"}, "bf16", (49, 480, 720), "inductor", "blocks", "cpu")
    ) == cache_key(base)


def signed_entry(store, described: dict, secret: bytes, data: bytes) -> CompileCache:
    """An entry as a worker of this fleet writes it: consistent size, sha256 and signature."""
    import hashlib

    cache = CompileCache(store, described, secret)
    sha256 = hashlib.sha256(data).hexdigest()
    entry = {"identity": described, "bytes": len(data), "sha256": sha256, "signature": cache._signature(sha256)}
    store.write_bytes(f"compile-cache/{cache.key}.bin", data)
    store.write_bytes(f"compile-cache/{cache.key}.json", json.dumps(entry).encode())
    return cache


def test_a_compile_cache_entry_that_lies_about_itself_is_not_loaded(tmp_path, caplog):
    from common.store import Store

    store = Store(str(tmp_path))
    described = {"precision": "bf16", "size": [9, 16, 16]}
    cache = CompileCache(store, described, b"fleet-secret")
    store.write_bytes(f"compile-cache/{cache.key}.bin", b"x" * 10)
    store.write_bytes(f"compile-cache/{cache.key}.json", json.dumps({"identity": {"precision": "fp8"}}).encode())
    assert not cache.load()
    assert not CompileCache(None, described, b"s").load() and CompileCache(None, described, b"s").save() == 0
    # Damaged but signed, right size and sha256: torch itself gets it, refuses it, and the worker compiles.
    assert not signed_entry(store, described, b"fleet-secret", b"not torch's artifacts").load()
    assert "not used (torch cannot read it)" in caplog.text


@pytest.mark.parametrize("where", ["site-packages", "/cache"])
def test_an_artifact_that_would_write_outside_torchs_cache_is_refused_even_when_signed(tmp_path, caplog, where):
    """torch joins an artifact's key onto its cache folder: an absolute key writes anywhere (a
    `.pth` in site-packages runs at the next Python start). Refused before torch sees it, checked
    against the folder torch resolves (a key under "/cache" once passed a check against that name)."""
    import uuid

    from torch.compiler._cache import CacheArtifactManager

    from common.store import Store

    planted = tmp_path / "site-packages" / "planted.pth" if where == "site-packages" else Path(f"/cache/planted-{uuid.uuid4().hex}.pth")
    planted.parent.mkdir(exist_ok=True)
    CacheArtifactManager._ensure_cache_artifacts_registered()  # as torch does before reading artifacts
    CacheArtifactManager.clear()
    CacheArtifactManager.record_artifact("autotune", str(planted), {"import os": 1})
    data, _ = torch.compiler.save_cache_artifacts()
    CacheArtifactManager.clear()
    store, described = Store(str(tmp_path / "store")), {"precision": "bf16", "size": [9, 16, 16]}
    cache = signed_entry(store, described, b"fleet-secret", data)
    assert not cache.load() and not planted.exists()
    assert "would write outside torch's cache folder" in caplog.text
    torch.compiler.load_cache_artifacts(data)  # what torch alone does with it: the attack is real
    assert planted.exists()
    planted.unlink()


def test_an_empty_compile_cache_secret_is_refused_at_start(tmp_path):
    """`SecretStr("")` is falsy: an empty secret once turned signing off without a word."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set but empty"):
        Settings(compile_cache_secret=" ")
    env = {**os.environ, "LORAFLEET_COMPILE_CACHE_SECRET": "", "LORAFLEET_STORE_URL": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "lorafleet", "worker", "--device", "cpu"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "lorafleet: LORAFLEET_COMPILE_CACHE_SECRET: set but empty" in done.stderr


GRAPH_RUNS: list[int] = []  # one entry per call of a graph compiled by the counting backend


@torch._dynamo.register_backend(name="lorafleet_counting")
def counting_backend(graph, example_inputs):
    """torch.compile's graphs, run as they are, counting each call: whether a job ran compiled."""

    def run(*args):
        GRAPH_RUNS.append(1)
        return graph(*args)

    return run


def test_compiled_renderers_of_every_kind_run_their_jobs_compiled(tiny_kinds, tmp_path):
    """Several compiled renderers in one process (`lorafleet render` with several aliases): each
    compiles at start for its default size, with a warm-up called as a job calls the pipeline (an
    image for image-to-video, 1.5's rotary and frame patches), and its jobs then run that graph,
    with no new one."""
    from workers.renderer import Renderer, compiled_graphs

    common = dict(adapter_cache_dir=str(tmp_path), compile_cache=False)
    kinds = ["i2v", "t2v-1.5", "i2v-1.5"]
    compiled = {
        kind: Renderer(tiny_kinds[kind]["model"], "cpu", Settings(compile=True, compile_backend="lorafleet_counting", **common), kind)
        for kind in kinds
    }  # fmt: skip
    graphs = compiled_graphs()
    for kind in kinds:
        paths = tiny_kinds[kind]
        job = {"prompt": "a cat", "seed": 3, "steps": 2, "adapters": [paths["style"]]}
        if "i2v" in kind:
            job["image"] = paths["sunset"]
        (finished,) = prepare_job(job, "test", compiled[kind].info, resolver_for())
        runs = len(GRAPH_RUNS)
        frames = compiled[kind].render(finished)[0]
        assert len(GRAPH_RUNS) > runs, f"{kind}: the job did not run the compiled graph"
        eager = Renderer(paths["model"], "cpu", Settings(**common), kind)
        np.testing.assert_allclose(frames, eager.render(finished)[0], atol=1e-5)
    assert compiled_graphs() == graphs


@pytest.mark.parametrize("sharded", [False, True])
def test_the_fp8_tiers_pristine_weights_are_the_bf16_weights_the_pipeline_loads(tiny, tmp_path, sharded):
    """fp8 workers read W0 from the model's files instead of keeping a host copy: it must be, bit
    for bit, what `from_pretrained` loads in bf16 (what the bf16 tier fuses from), from one file
    or from shards (5B's transformer is saved in several)."""
    from diffusers import DiffusionPipeline

    from workers.fp8 import SavedWeights

    model = tiny["model"]
    if sharded:
        model = str(tmp_path / "model")
        shutil.copytree(tiny["model"], model)
        shutil.rmtree(os.path.join(model, "transformer"))
        pipe = DiffusionPipeline.from_pretrained(tiny["model"])
        pipe.transformer.save_pretrained(os.path.join(model, "transformer"), max_shard_size="20KB")
        assert os.path.exists(os.path.join(model, "transformer", "diffusion_pytorch_model.safetensors.index.json"))
    transformer = DiffusionPipeline.from_pretrained(model, dtype=torch.bfloat16).transformer
    linears = {name: m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    saved = SavedWeights(model, linears, torch.bfloat16)
    assert set(saved) == set(linears) and len(saved) == len(linears)
    for name, module in linears.items():
        assert torch.equal(saved[name], module.weight.detach()), name
    assert "no.such.layer" not in saved


def test_only_entries_this_fleet_signed_are_loaded(tmp_path, monkeypatch):
    """Compile artifacts run as code on the workers: an entry someone else wrote into the store
    (signed with another secret, or unsigned) is refused."""
    from common.store import Store

    monkeypatch.setenv("LORAFLEET_COMPILE_CACHE_SECRET", "fleet-secret")
    settings = Settings()
    assert settings_env(settings)["LORAFLEET_COMPILE_CACHE_SECRET"] == "fleet-secret"  # the workers get it
    secret = settings.compile_cache_secret.get_secret_value().encode()
    store, described = Store(str(tmp_path)), {"precision": "bf16", "size": [9, 16, 16]}
    loaded = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"torch's artifacts", None))
    monkeypatch.setattr("workers.compile_cache.load_artifacts", loaded.append)
    CompileCache(store, described, b"another fleet's secret").save()
    assert not CompileCache(store, described, secret).load() and loaded == []
    unsigned = json.loads(store.read_bytes(f"compile-cache/{cache_key(described)}.json"))
    store.write_bytes(f"compile-cache/{cache_key(described)}.json", json.dumps(unsigned | {"signature": None}).encode())
    assert not CompileCache(store, described, secret).load() and loaded == []
    assert CompileCache(store, described, secret).save() > 0
    assert CompileCache(store, described, secret).load() and loaded == [b"torch's artifacts"]


@pytest.mark.parametrize("scope", ["blocks", "whole"])
def test_compiling_by_blocks_makes_a_graph_that_every_block_runs(tiny, tmp_path, scope):
    """`compile_scope=blocks` compiles a transformer block, and all the model's blocks run that
    graph (a cold compile costs a block's, not the model's); `whole` compiles the transformer as one
    graph. Both render what the eager renderer renders."""
    from diffusers import CogVideoXTransformer3DModel

    from workers.renderer import Renderer, compiled_graphs

    model = tmp_path / "model"  # the tiny model with three blocks instead of one
    shutil.copytree(tiny["model"], model)
    config = dict(CogVideoXTransformer3DModel.load_config(model / "transformer"), num_layers=3)
    torch.manual_seed(0)
    CogVideoXTransformer3DModel.from_config(config).save_pretrained(model / "transformer")
    common = dict(adapter_cache_dir=str(tmp_path / "adapters"), compile_cache=False)
    graphs = compiled_graphs()
    settings = Settings(compile=True, compile_backend="lorafleet_counting", compile_scope=scope, **common)
    compiled = Renderer(str(model), "cpu", settings, "test")
    # The first block's input is a strided view of the embeddings, the others' are not: two graphs.
    assert compiled_graphs() - graphs == (2 if scope == "blocks" else 1)
    (job,) = prepare_job({"prompt": "a cat", "seed": 3, "steps": 3, "adapters": [tiny["style"]]}, "test",
                         compiled.info, resolver_for())  # fmt: skip
    runs = len(GRAPH_RUNS)
    frames = compiled.render(job)[0]
    assert len(GRAPH_RUNS) - runs == 3 * (3 if scope == "blocks" else 1)  # per step: each block, or the whole
    np.testing.assert_allclose(
        frames, Renderer(str(model), "cpu", Settings(**common), "test").render(job)[0], atol=1e-5
    )
