"""The job as one typed value, from the moment its line is checked and its adapters resolved to the
GPU that renders it: `Job`, frozen. Its key, the SHA-256 of everything that decides its pixels
(docs/design.md), and an adapter combination's identity live here too.

A job becomes a dict only at the wire: `Job.message()` for a Celery message, the batch's jobs.jsonl
and a video's metadata; `Job.model_validate` reads one back. How a jobs file or a message becomes
jobs is common/jobs_file.py, with common/job_spec.py and common/resolver.py.
"""

import hashlib
import json
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from common.model import ModelInfo


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ResolvedAdapter(Frozen):
    """One adapter of a job, found: where the user said it is, where it was read, its content hash."""

    uri: str
    weight: float = 1.0
    alpha: float | None = None
    name: str | None = None
    url: str  # an fsspec URL any worker can read
    sha256: str  # of the file, and of the PEFT config beside it if there is one


class ResolvedImage(Frozen):
    """A job's input image, found: where the user said it is, where it was read, its content hash."""

    uri: str
    url: str
    sha256: str


class JobContent(Frozen):
    """Everything a job is but its key: one render, every default filled in, every file resolved."""

    prompt: str
    negative_prompt: str = ""
    adapters: tuple[ResolvedAdapter, ...] = ()
    image: ResolvedImage | None = None
    lora_scale: float
    seed: int
    num_frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    fps: int
    fuse: bool
    model: str | None = None  # the model alias; None: the fleet's default model
    priority: str | None = None  # high, normal or low; not part of the key
    id: str | None = None  # the user's label; not part of the key
    batch: str | None = None  # set when it is sent; not part of the key

    @property
    def combination(self) -> tuple[tuple[str, float, float | None], ...]:
        """What the job's adapters contribute to its pixels (`adapter_combination`)."""
        return adapter_combination(self.adapters, self.lora_scale)


class Job(JobContent):
    """One job, checked, resolved and keyed: what the producer sends and a worker renders."""

    key: str

    @classmethod
    def keyed(cls, content: dict, model: ModelInfo) -> "Job":
        """The job of checked content (JobContent's fields, as values, not dicts) with its key.
        Built without a second validation: a big file's jobs are many, and each was checked."""
        return cls.model_construct(**content, key=key_of(content, model))

    def message(self, batch: str | None = None) -> dict:
        """The job as JSON data (in `batch`, if given): a `lorafleet.render` message, a jobs.jsonl
        line, the metadata's `job`."""
        message = self.model_dump(mode="json")
        if batch is not None:
            message["batch"] = batch
        return message


def adapter_combination(adapters: Iterable, lora_scale: float) -> tuple[tuple[str, float, float | None], ...]:
    """What a set of adapters contributes to the pixels at `lora_scale`: (content hash, weight,
    alpha) of each, in one canonical order; empty at lora_scale 0, where no adapter touches a
    pixel. The one identity of an adapter combination: in the job key, the worker's variant cache
    and the sweep report. `adapters` are ResolvedAdapters, or mappings with the same names."""
    if lora_scale == 0:
        return ()
    terms = []
    for adapter in adapters:
        get = adapter.get if isinstance(adapter, dict) else lambda name, a=adapter: getattr(a, name)
        terms.append({"sha256": get("sha256"), "weight": float(get("weight")), "alpha": get("alpha")})
    if len(terms) > 1:
        terms.sort(key=lambda term: json.dumps(term, sort_keys=True))
    return tuple((term["sha256"], term["weight"], term["alpha"]) for term in terms)


def job_key(job: JobContent, model: ModelInfo) -> str:
    """The SHA-256 of everything that decides the output: the same job always gets the same key."""
    return key_of(dict(job), model)


def key_of(job: dict, model: ModelInfo) -> str:
    """`job_key` of a job's fields (JobContent's, by name)."""
    decisive = {
        "model": model.ref,
        "scheduler": model.scheduler,
        # At lora_scale 0 every combination is empty: it shares the base's key and video.
        "adapters": [
            {"sha256": sha256, "weight": weight, "alpha": alpha}
            for sha256, weight, alpha in adapter_combination(job["adapters"], job["lora_scale"])
        ],
        "lora_scale": float(job["lora_scale"]),
        "seed": job["seed"],
        "prompt": job["prompt"],
        "negative_prompt": job["negative_prompt"],
        "num_frames": job["num_frames"],
        "height": job["height"],
        "width": job["width"],
        "steps": job["steps"],
        "guidance_scale": float(job["guidance_scale"]),
        "use_dynamic_cfg": job["use_dynamic_cfg"],
        "fps": job["fps"],
        "fuse": job["fuse"],
    }
    # Each below is absent from the keys of jobs without it: those keys stay as they were.
    if job.get("image") is not None:  # its content decides the pixels, not its path
        decisive["image"] = job["image"].sha256
    if model.precision != "bf16":  # fp8 weights give other pixels than bf16's
        decisive["precision"] = model.precision
    if model.attention != "sdpa":  # another attention kernel rounds otherwise
        decisive["attention"] = model.attention
    if model.cache:  # a draft: its cache hook skips or predicts work the exact render does
        decisive["cache"] = json.loads(model.cache)
    return hashlib.sha256(_CANONICAL.encode(decisive).encode()).hexdigest()


# The key's canonical JSON (sorted keys, no spaces, UTF-8): one encoder, not one a job.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
