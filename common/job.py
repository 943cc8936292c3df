"""The job: checking it (its schema is JobSpec, common/job_spec.py) with line-numbered errors,
expanding its lists, resolving its adapters, and its key (docs/design.md).

A job goes through three steps, on the producer or, for a message without a key, on the worker:
check it (`check_job`), expand its lists (`expand_job`), resolve its adapters and key it
(`finish_job`). `load_jobs` does all three for a whole file and raises every error at once.
"""

import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import ValidationError

from common.adapters import DEFAULT_POLICY, AdapterFile, ReadPolicy, open_regular_file, read_adapter
from common.errors import AdapterError, JobError, JobFileError, LorafleetError, ModelError
from common.images import ImageFile, read_image
from common.job_spec import JobSpec, describe
from common.lora_formats import check_shapes, detect_layout
from common.manifest import check_batch_name
from common.model import ModelInfo, model_resolver
from common.store import Store

SHA256_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class JobLimits:
    """How much one submission may ask for; refused before anything is expanded or read."""

    max_jobs: int = 100_000
    max_video_pixels: int = 100_000_000  # frames × height × width of one job

    @classmethod
    def from_settings(cls, settings) -> "JobLimits":
        """LORAFLEET_MAX_JOBS and LORAFLEET_MAX_VIDEO_PIXELS."""
        return cls(settings.max_jobs, settings.max_video_pixels)


DEFAULT_LIMITS = JobLimits()


def check_job(
    obj, where: str, model: ModelInfo | None, max_video_pixels: int = JobLimits.max_video_pixels
) -> tuple[dict, list[str]]:
    """Check one job against the schema (JobSpec) and the model's rules (None: the schema alone);
    returns it as a dict with defaults filled in (lora_scale and seed as lists), and the list of
    errors, each starting with `where` (e.g. "line 3") and naming the field ("adapters[1].weight")."""
    if not isinstance(obj, dict):
        return {}, [f"{where}: a job must be a JSON object, got {type(obj).__name__}"]
    try:
        spec = JobSpec.model_validate(obj)
    except ValidationError as exc:
        return {}, [
            f"{where}: {field}: {message}" if field else f"{where}: {message}" for field, message in describe(exc, obj)
        ]
    job = spec.model_dump(exclude={"key", "batch"})
    if job["seed"] is None:
        job["seed"] = [secrets.randbelow(2**32)]  # drawn once, then written into the job
    if model is None:
        return job, []
    problems = check_render(job, model, max_video_pixels)
    if model.takes_image and job.get("image") is None:
        problems.append(("image", "required: this model turns an image into a video"))
    elif job.get("image") is not None and not model.takes_image:
        problems.append(("image", "this model is text-to-video and takes no image (name an image-to-video model)"))
    if model.precision == "fp8" and not job["fuse"]:
        problems.append(("fuse", "must be true on an fp8 model: its adapters are fused into the fp8 weights"))
    return job, [f"{where}: {field}: {problem}" for field, problem in problems]


def check_render(job: dict, model: ModelInfo, max_video_pixels: int) -> list[tuple[str, str]]:
    """Fill in the model's own frames, height and width where a job leaves them out, and check
    them against the model's rules and the pixel limit; returns (field, problem) pairs."""
    for field in ("num_frames", "height", "width"):
        if job.get(field) is None:
            job[field] = getattr(model, field)
    problems = [
        (field, f"{problem}, got {job[field]}")
        for field, problem in model.check_size(job["num_frames"], job["height"], job["width"])
    ]
    pixels = job["num_frames"] * job["height"] * job["width"]
    if pixels > max_video_pixels:
        problems.append(
            (
                "num_frames × height × width",
                f"{job['num_frames']}×{job['height']}×{job['width']} is {pixels:,} pixels, "
                f"more than {max_video_pixels:,} (LORAFLEET_MAX_VIDEO_PIXELS)",
            )
        )
    return problems


def expand_job(job: dict) -> list[dict]:
    """One job per (lora_scale, seed) pair of a checked job's lists."""
    return [{**job, "lora_scale": scale, "seed": seed} for scale in job["lora_scale"] for seed in job["seed"]]


def adapter_combination(job: dict) -> tuple[tuple[str, float, float | None], ...]:
    """What a job's adapters contribute to its pixels: (content hash, weight, alpha) of each, in one
    canonical order; empty at lora_scale 0, where no adapter touches a pixel. The one identity of an
    adapter combination: in the job key, the worker's variant cache and the sweep report."""
    if job["lora_scale"] == 0:
        return ()
    terms = [{"sha256": a["sha256"], "weight": float(a["weight"]), "alpha": a["alpha"]} for a in job["adapters"]]
    terms.sort(key=lambda term: json.dumps(term, sort_keys=True))
    return tuple((term["sha256"], term["weight"], term["alpha"]) for term in terms)


def job_key(job: dict, model: ModelInfo) -> str:
    """The SHA-256 of everything that decides the output: the same job always gets the same key."""
    decisive = {
        "model": model.ref,
        "scheduler": model.scheduler,
        # At lora_scale 0 every combination is empty: it shares the base's key and video.
        "adapters": [
            {"sha256": sha256, "weight": weight, "alpha": alpha} for sha256, weight, alpha in adapter_combination(job)
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
        decisive["image"] = job["image"]["sha256"]
    if model.precision != "bf16":  # fp8 weights give other pixels than bf16's
        decisive["precision"] = model.precision
    canonical = json.dumps(decisive, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class AdapterResolver:
    """Resolves adapter URIs to files under a read policy, reading each distinct URI once per
    resolver: one per submitted file, one per worker message (a worker never caches by path)."""

    def __init__(self, store: Store | None, policy: ReadPolicy = DEFAULT_POLICY):
        self.store = store
        self.policy = policy
        self._seen: dict[str, AdapterFile | AdapterError] = {}
        self._images: dict[str, ImageFile | AdapterError] = {}

    @classmethod
    def from_settings(cls, settings, store: Store | None) -> "AdapterResolver":
        """A resolver under the settings' read policy."""
        return cls(store, ReadPolicy.from_settings(settings))

    def resolve(self, uri: str) -> AdapterFile:
        """The adapter file a URI means; raises AdapterError naming what was checked."""
        return self._once(self._seen, uri, lambda: read_adapter(uri, self.store, self.policy)[0])

    def image(self, uri: str) -> ImageFile:
        """The image a URI means, read and decoded; raises ImageError naming what was checked."""
        return self._once(self._images, uri, lambda: read_image(uri, self.store, self.policy)[0])

    @staticmethod
    def _once(cache: dict, uri: str, read):
        """`read()`'s file, or its error, remembered per URI: each is read once per resolver."""
        if uri not in cache:
            try:
                cache[uri] = read()
            except AdapterError as exc:
                cache[uri] = exc
        found = cache[uri]
        if isinstance(found, AdapterError):
            raise found
        return found


def finish_job(job: dict, model: ModelInfo, resolver: AdapterResolver) -> dict:
    """Resolve an expanded job's adapters to content hashes and compute its key."""
    adapters = []
    for adapter in job["adapters"]:
        found = resolver.resolve(adapter["uri"])
        if model.linear_layers:  # the model's architecture is known: check the adapter fits it now
            try:
                check_shapes(
                    detect_layout(list(found.tensors), model.linear_layers), found.shapes(), model.linear_layers
                )
            except AdapterError as exc:
                raise AdapterError(f'adapter "{adapter["uri"]}": {exc}') from None
        adapters.append({**adapter, "url": found.url, "sha256": found.sha256})
    finished = {**job, "adapters": adapters}
    if job.get("image") is not None:
        found = resolver.image(job["image"]["uri"])
        finished["image"] = {**job["image"], "url": found.url, "sha256": found.sha256}
    finished["key"] = job_key(finished, model)
    return finished


def read_job_lines(path: str, max_jobs: int) -> Iterator[tuple[int, object, str | None]]:
    """(line number, JSON object, None) for each job line of a .jsonl file, or (line number, None,
    error) for a line that is not JSON; read as a stream, stopping with one error past `max_jobs` lines."""
    try:
        f = open_regular_file(path)
    except OSError as exc:
        raise JobFileError(path, [f"cannot open: {exc.strerror or exc}"]) from None
    if f is None:
        raise JobFileError(path, ["not a regular file (a device, FIFO or socket): not read"])
    with f:
        lines = 0
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None, f"line {number}: not UTF-8 text"
                continue
            if not line.strip():
                continue
            lines += 1
            if lines > max_jobs:
                yield (
                    number,
                    None,
                    f"line {number}: more than {max_jobs} jobs in one file (LORAFLEET_MAX_JOBS): split it",
                )
                return
            try:
                yield number, json.loads(line), None
            except (ValueError, RecursionError) as exc:
                reason = exc.args[0].split(":")[0] if isinstance(exc, ValueError) else "nested too deep"
                yield number, None, f"line {number}: not valid JSON ({reason})"


def load_jobs(path: str, model_for, resolver: AdapterResolver, limits: JobLimits = DEFAULT_LIMITS) -> list[dict]:
    """Every job of a .jsonl file, checked, expanded, resolved and keyed; raises JobFileError
    listing every bad line in line order, so nothing is enqueued unless the whole file is good.

    `model_for(alias)` gives the ModelInfo of a model alias (None: the fleet's default model)
    or raises ModelError; a model that cannot be read is one error for the whole file, and its
    lines are still checked against the schema. Each line's lists are counted before they are
    expanded: a line asking for millions of jobs is refused without building them.
    """
    errors: list[str] = []
    jobs: list[dict] = []
    models: dict = {}  # alias -> ModelInfo, or the ModelError it gave (asked once per file)
    expands_to = lines = 0
    for number, obj, error in read_job_lines(path, limits.max_jobs):
        lines += 1
        if error is not None:
            errors.append(error)
            continue
        where = f"line {number}"
        alias = obj.get("model") if isinstance(obj, dict) else None
        key = alias if isinstance(alias, str) or alias is None else json.dumps(alias)
        if key not in models:
            try:
                models[key] = model_for(alias)
            except ModelError as exc:
                models[key] = exc
                errors.append(f"{where}: model: {exc}" + (" (every line that names it)" if alias else " (every line)"))
        model = models[key]
        job, problems = check_job(obj, where, None if isinstance(model, ModelError) else model, limits.max_video_pixels)
        if problems:  # and the adapters it names, so that one run shows every problem of the line
            errors.extend(problems + [f"{where}: {exc}" for exc in unreadable_adapters(obj, resolver)])
        if problems or isinstance(model, ModelError):
            continue
        expands_to += len(job["lora_scale"]) * len(job["seed"])
        if expands_to > limits.max_jobs:
            continue  # counted, never expanded: the file is refused anyway
        try:
            jobs.extend(finish_job(one, model, resolver) for one in expand_job(job))
        except AdapterError as exc:
            errors.append(f"{where}: {exc}")
    if not lines:
        errors.append("no jobs: the file is empty")
    if expands_to > limits.max_jobs:
        errors.append(
            f"the file expands to {expands_to} jobs, more than {limits.max_jobs} (LORAFLEET_MAX_JOBS): split it"
        )
    if errors:
        raise JobFileError(path, errors)
    return jobs


def load_jobs_for(path: str, settings, store: Store) -> list[dict]:
    """`load_jobs` as the settings say: the fleet's models, the adapter read policy, the limits."""
    return load_jobs(
        path,
        model_resolver(settings),
        AdapterResolver.from_settings(settings, store),
        JobLimits.from_settings(settings),
    )


def unreadable_adapters(obj: dict, resolver: AdapterResolver) -> list[AdapterError]:
    """What is wrong with the adapters a job names, read even when other fields are bad."""
    found = []
    adapters = obj.get("adapters") if isinstance(obj, dict) else None
    for item in adapters if isinstance(adapters, list) else []:
        uri = item if isinstance(item, str) else item.get("uri") if isinstance(item, dict) else None
        if isinstance(uri, str) and uri.strip():
            try:
                resolver.resolve(uri)
            except AdapterError as exc:
                found.append(exc)
    return found


def job_from_message(
    message, model: ModelInfo, resolver: AdapterResolver, max_video_pixels: int = JobLimits.max_video_pixels
) -> dict:
    """The job a `lorafleet.render` message asks for, checked as strictly as a submitted line.

    Whoever can write to Redis can send one, so nothing in it is trusted that can be derived: the
    key is always computed here from the content, and a message whose own key differs is refused.
    A message from the producer carries each adapter's url and content hash (checked against the
    file when it is read); one from another client may leave them out, and they are resolved here.
    """
    job, errors = check_job(message, "job", model, max_video_pixels)
    for field in ("lora_scale", "seed"):
        if not errors and len(job[field]) != 1:
            errors.append(f"job: {field}: a message is one job, so a single value (submit expands lists)")
    if errors:
        raise JobError("; ".join(errors))
    (job,) = expand_job(job)
    batch = message.get("batch")
    if batch is not None:
        try:
            check_batch_name(batch)
        except LorafleetError as exc:
            raise JobError(f"job: batch: {exc}") from None
    job["batch"] = batch
    given = message.get("key")
    if given is not None and not (isinstance(given, str) and len(given) == 64 and set(given) <= SHA256_HEX):
        raise JobError("job: key: must be the 64 hex digits of a SHA-256 (or left out)")
    files = {f"adapters[{i}]": adapter for i, adapter in enumerate(job["adapters"])}
    if job.get("image") is not None:
        files["image"] = job["image"]
    resolved = [
        isinstance(f.get("url"), str) and isinstance(f.get("sha256"), str) and len(f["sha256"]) == 64
        for f in files.values()
    ]
    if all(resolved):
        for field, file in files.items():
            if not resolver.policy.allows(file["url"], resolver.store):
                raise JobError(f"job: {field}: {resolver.policy.refusal(file['url'])}")
        job = {**job, "key": job_key(job, model)}
    else:
        try:
            job = finish_job(job, model, resolver)
        except AdapterError as exc:
            raise JobError(f"job: {exc}") from None
    if given is not None and given != job["key"]:
        raise JobError(f"job: key: the message says {given} but its content hashes to {job['key']}: refused")
    return job
