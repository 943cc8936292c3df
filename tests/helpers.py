"""What tests check the way a user would: decoding videos, reading manifests, counting the queue."""

import contextlib
import functools
import json
import os
import re
import signal
import time

import imageio.v3 as iio
import numpy as np


def decode_video(path: str) -> np.ndarray:
    """All frames of an MP4, decoded by ffmpeg: (frames, height, width, 3) uint8."""
    return np.stack(list(iio.imiter(path, plugin="FFMPEG")))


def read_manifest(path: str) -> list[dict]:
    """The lines of a batch manifest."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def queued_messages(redis_url: str, queue: str = "render") -> int:
    """How many messages wait in a Celery queue on Redis, at every priority."""
    import redis

    from common.broker import queue_length

    client = redis.Redis.from_url(redis_url)
    try:
        return queue_length(client, queue)
    finally:
        client.close()


def video_info(path: str) -> dict:
    """What ffmpeg says of a video: codec, fps, size (width, height)."""
    return iio.immeta(path, plugin="FFMPEG")


def render_records(log_paths) -> dict[str, int]:
    """How many times each key (its first 12 hex digits) was rendered, from the workers' own log lines."""
    counts: dict[str, int] = {}
    for path in log_paths:
        for key in re.findall(r": ([0-9a-f]{12}) rendered in ", open(path).read()):
            counts[key] = counts.get(key, 0) + 1
    return counts


def resolver_for(store=None):
    """An AdapterResolver under the default settings' read policy."""
    from common.resolver import AdapterResolver
    from common.settings import Settings

    return AdapterResolver.from_settings(Settings(), store)


def default_policy(**changes):
    """The default settings' read policy, with `changes`."""
    import dataclasses

    from common.reading import ReadPolicy
    from common.settings import Settings

    return dataclasses.replace(ReadPolicy.from_settings(Settings()), **changes)


def default_limits():
    """The default settings' job limits."""
    from common.jobs_file import JobLimits
    from common.settings import Settings

    return JobLimits.from_settings(Settings())


def prepare_job(obj: dict, where: str, model, resolver=None) -> list:
    """Check, expand and resolve one job object as submit does (its Jobs); raises JobError with every problem."""
    from common.errors import AdapterError, JobError
    from common.job_spec import check_job, expand_job
    from common.resolver import resolve_job

    spec, errors = check_job(obj, where, model, default_limits().max_video_pixels)
    if errors:
        raise JobError("\n".join(errors))
    resolver = resolver or resolver_for()
    try:
        return [resolve_job(spec, scale, seed, model, resolver) for scale, seed in expand_job(spec)]
    except AdapterError as exc:
        raise JobError(f"{where}: {exc}") from None


def plant_batch(store, name: str, keys: list[str], status: str = "done") -> None:
    """A batch as `submit` and the workers leave it in a store (manifest, jobs, each key's outputs),
    without rendering: for tests of what reads or removes stored batches."""
    from common.manifest import Batch, JobStatus, ManifestEntry
    from common.store import video_path

    entries = []
    for key in keys:
        entries.append(ManifestEntry(key=key, status=JobStatus(status), task_id=key[:8]))
        for suffix in ("mp4", "png", "json"):
            store.write_bytes(video_path(key, suffix), b"\0" * 1000)
    batch = Batch(name, entries)
    batch.write_jobs(store, [planted_job(key) for key in keys])
    batch.write_manifest(store)


def planted_job(key: str):
    """A Job under a given key, as if submitted (its key is not its content's: nothing renders it)."""
    from common.job import Job

    return Job(key=key, prompt="a cat", lora_scale=1.0, seed=1, num_frames=9, height=16, width=16, steps=2,
               guidance_scale=6.0, use_dynamic_cfg=False, fps=8, fuse=True)  # fmt: skip


def write_lora(folder, seed: int = 0, rank: int = 2, width: int = 32) -> str:
    """A LoRA adapter in diffusers' format written by hand (numpy, no torch): one block's attention
    projections of a model `width` wide, as `folder/pytorch_lora_weights.safetensors`; returns the folder."""
    import os
    import struct

    rng = np.random.default_rng(seed)
    tensors, header, offset = [], {}, 0
    for projection in ("to_q", "to_k", "to_v", "to_out.0"):
        for role, shape in (("lora_A", (rank, width)), ("lora_B", (width, rank))):
            data = rng.standard_normal(shape).astype("<f4").tobytes()
            name = f"transformer.transformer_blocks.0.attn1.{projection}.{role}.weight"
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
            tensors.append(data)
            offset += len(data)
    encoded = json.dumps(header).encode()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "pytorch_lora_weights.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(tensors))
    return str(folder)


def app_for(env: dict):
    """A Celery app on the fleet of `env` (its LORAFLEET_REDIS_URL)."""
    from common.broker import make_app
    from common.settings import Settings

    return make_app(Settings(redis_url=env["LORAFLEET_REDIS_URL"]))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """`predicate()`'s first true value, asked every `interval` s; fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def submit_one(job: dict, tmp_path, env: dict, *flags: str):
    """`lorafleet submit` of a file holding this one job."""
    from tests.conftest import lorafleet

    jobs = tmp_path / "one-job.jsonl"
    jobs.write_text(json.dumps(job) + "\n")
    return lorafleet("submit", str(jobs), *flags, env=env)


@functools.cache
def _ledger(redis_url: str):
    from common.leases import Ledger

    return Ledger(redis_url, lease_s=30, ttl_s=60)


def progress_of(result, env: dict) -> dict | None:
    """A running job as its worker's heartbeat says it: {"worker", "key", "step", "steps"} (the
    step is None before the first), or None while no worker says it runs the job."""
    for record in _ledger(env["LORAFLEET_REDIS_URL"]).live_workers():
        if record.job is not None and record.job.task_id == result.id:
            return {"worker": record.worker, "key": record.job.key, "step": record.job.step, "steps": record.job.steps}
    return None


def long_job(seed: int, steps: int = 700) -> dict:
    """A job of many small denoising steps: seconds of rendering on the tiny model."""
    return {"prompt": "a paper boat floats down a stream", "seed": seed, "steps": steps, "height": 32, "width": 32}


@contextlib.contextmanager
def frozen(worker):
    """The worker stopped (SIGSTOP) mid-render while the operator acts, well inside its lease: its
    job is still running when the commands land, however fast this machine renders 1000 steps
    (about 3 s here: a race the commands lost on a busy CI machine)."""
    os.killpg(worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(worker.pid, signal.SIGCONT)


def chromium() -> str:
    """The browser the report tests use: under CI a missing one fails (`make install` installs it)."""
    import shutil

    import pytest

    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make install` installs it (apt-get install chromium)")
        pytest.skip("no chromium here: `make install` as root installs it")
    return browser


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--allow-file-access-from-files",
    "--autoplay-policy=no-user-gesture-required",
]  # fmt: skip


def probe_page(page: str, probe: str, profile: str, budget_ms: int = 20000) -> dict:
    """Open a copy of the HTML page `page` with the script `probe` appended in headless Chromium, and
    return what the probe wrote into the page as JSON (document.body's `data-probe`)."""
    import subprocess

    probed = f"{page}.probe.html"  # beside the page: its relative links still resolve
    with open(probed, "w") as f:
        f.write(open(page).read() + probe)
    dom = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
         "--dump-dom", f"file://{probed}"],
        capture_output=True, text=True, timeout=180,
    ).stdout  # fmt: skip
    return json.loads(re.search(r"data-probe=\"([^\"]+)\"", dom).group(1).replace("&quot;", '"'))


# What a reader sees of a report page in a browser: the visible suggestions, refinement lines and
# marks, notices (by kind) and the exact picks of a draft night.
REPORT_PROBE = """<script>
  window.addEventListener('load', () => {
    const visible = e => e.offsetParent !== null && e.getBoundingClientRect().height > 0;
    const shown = selector => [...document.querySelectorAll(selector)].filter(visible);
    const texts = selector => shown(selector).map(e => e.textContent);
    document.body.setAttribute('data-probe', JSON.stringify({
      suggested: texts('.suggested-scale'), confirmed: texts('.confirmed-scale'), refinement: texts('.refinement'),
      refined: texts('i.refined'), notices: shown('.notice').map(e => e.dataset.kind || e.className),
    }));
  });
</script>"""
