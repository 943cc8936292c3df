"""From what a user or a client wrote to Jobs (common/job.py): a jobs file's lines, a sweep's
cells, a `lorafleet.render` message. Each goes through three steps, on the producer or, for a
message without a key, on the worker: check it against the schema (JobSpec) and the model's rules
(`check_job`), expand its lists (`expand_job`), resolve its adapters and image and key it
(`resolve_job`). `load_jobs` does all three for a whole file and raises every error at once, each
naming its line and field.
"""

import functools
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import ValidationError

from common.adapters import AdapterFile, read_adapter
from common.errors import AdapterError, JobError, JobFileError, ModelError
from common.images import ImageFile, read_image
from common.job import Job, JobContent, ResolvedAdapter, ResolvedImage
from common.job_spec import JobSpec, describe
from common.lora_formats import check_shapes, detect_layout
from common.model import ModelInfo, model_resolver
from common.reading import ReadPolicy, open_regular_file
from common.store import Store

SHA256_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class JobLimits:
    """How much one submission may ask for; refused before anything is expanded or read."""

    max_jobs: int
    max_video_pixels: int  # frames × height × width of one job

    @classmethod
    def from_settings(cls, settings) -> "JobLimits":
        """LORAFLEET_MAX_JOBS and LORAFLEET_MAX_VIDEO_PIXELS."""
        return cls(settings.max_jobs, settings.max_video_pixels)


class AdapterResolver:
    """Resolves adapter and image URIs to files under a read policy, reading each distinct URI once
    per resolver: one per submitted file, one per worker message (a worker never caches by path)."""

    def __init__(self, policy: ReadPolicy):
        self.policy = policy
        self._seen: dict[str, AdapterFile | AdapterError] = {}
        self._images: dict[str, ImageFile | AdapterError] = {}
        self._fits: set[tuple[str, str]] = set()  # (adapter hash, model) found to fit the model's layers

    @classmethod
    def from_settings(cls, settings, store: Store | None) -> "AdapterResolver":
        """A resolver under the settings' read policy, the store (if any) always allowed."""
        return cls(ReadPolicy.from_settings(settings, store.location if store is not None else None))

    def resolve(self, uri: str) -> AdapterFile:
        """The adapter file a URI means; raises AdapterError naming what was checked."""
        return self._once(self._seen, uri, lambda: read_adapter(uri, self.policy)[0])

    def image(self, uri: str) -> ImageFile:
        """The image a URI means, read and decoded; raises ImageError naming what was checked."""
        return self._once(self._images, uri, lambda: read_image(uri, self.policy)[0])

    def adapter(self, adapter, model: ModelInfo, given: bool = False) -> ResolvedAdapter:
        """A job's adapter term resolved: its file found and read (and checked against the model's
        layers when they are known, once per file), or, `given`, the URL and hash it carries,
        within the policy."""
        if given:
            return _resolved(
                adapter.uri, adapter.weight, adapter.alpha, adapter.name, self.allowed(adapter.url), adapter.sha256
            )
        found = self.resolve(adapter.uri)
        if model.linear_layers and (found.sha256, model.ref) not in self._fits:
            try:
                check_shapes(
                    detect_layout(list(found.tensors), model.linear_layers), found.shapes(), model.linear_layers
                )
            except AdapterError as exc:
                raise AdapterError(f'adapter "{adapter.uri}": {exc}') from None
            self._fits.add((found.sha256, model.ref))  # a sweep's thousands of jobs name a few adapters
        return _resolved(adapter.uri, adapter.weight, adapter.alpha, adapter.name, found.url, found.sha256)

    def input_image(self, image, given: bool = False) -> ResolvedImage:
        """A job's input image resolved, as `adapter` resolves an adapter."""
        if given:
            return ResolvedImage(uri=image.uri, url=self.allowed(image.url, "image"), sha256=image.sha256)
        found = self.image(image.uri)
        return ResolvedImage(uri=image.uri, url=found.url, sha256=found.sha256)

    def allowed(self, url: str, what: str = "adapter") -> str:
        """A resolved URL, if the read policy allows it; raises AdapterError if not."""
        if not self.policy.allows(url):
            raise self.policy.refusal(url, what)
        return url

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


def check_job(obj, where: str, model: ModelInfo | None, max_video_pixels: int) -> tuple[JobSpec | None, list[str]]:
    """Check one job against the schema (JobSpec) and the model's rules (None: the schema alone);
    returns it with the model's defaults filled in and its seed drawn if it had none, and the list
    of errors, each starting with `where` (e.g. "line 3") and naming the field ("adapters[1].weight")."""
    if not isinstance(obj, dict):
        return None, [f"{where}: a job must be a JSON object, got {type(obj).__name__}"]
    try:
        spec = JobSpec.model_validate(obj)
    except ValidationError as exc:
        return None, [
            f"{where}: {field}: {message}" if field else f"{where}: {message}" for field, message in describe(exc, obj)
        ]
    if spec.seed is None:
        spec = spec.model_copy(update={"seed": [secrets.randbelow(2**32)]})  # drawn once, then written into the job
    if model is None:
        return spec, []
    size, problems = render_size(spec.num_frames, spec.height, spec.width, model, max_video_pixels)
    spec = spec.model_copy(update=dict(zip(("num_frames", "height", "width"), size, strict=True)))
    if model.takes_image and spec.image is None:
        problems.append(("image", "required: this model turns an image into a video"))
    elif spec.image is not None and not model.takes_image:
        problems.append(("image", "this model is text-to-video and takes no image (name an image-to-video model)"))
    if model.precision == "fp8" and not spec.fuse:
        problems.append(("fuse", "must be true on an fp8 model: its adapters are fused into the fp8 weights"))
    return spec, [f"{where}: {field}: {problem}" for field, problem in problems]


def render_size(
    num_frames: int | None, height: int | None, width: int | None, model: ModelInfo, max_video_pixels: int
) -> tuple[tuple[int, int, int], list[tuple[str, str]]]:
    """A job's frames, height and width with the model's own where it leaves them out, and the
    (field, problem) pairs of the model's rules and the pixel limit."""
    size = (num_frames or model.num_frames, height or model.height, width or model.width)
    named = dict(zip(("num_frames", "height", "width"), size, strict=True))
    problems = [(field, f"{problem}, got {named[field]}") for field, problem in model.check_size(*size)]
    pixels = size[0] * size[1] * size[2]
    if pixels > max_video_pixels:
        problems.append(
            (
                "num_frames × height × width",
                f"{size[0]}×{size[1]}×{size[2]} is {pixels:,} pixels, "
                f"more than {max_video_pixels:,} (LORAFLEET_MAX_VIDEO_PIXELS)",
            )
        )
    return size, problems


def expand_job(spec: JobSpec) -> list[tuple[float, int]]:
    """The (lora_scale, seed) of each job a checked job's lists stand for."""
    return [(scale, seed) for scale in spec.lora_scale for seed in spec.seed]


def resolve_job(
    spec: JobSpec, scale: float, seed: int, model: ModelInfo, resolver: AdapterResolver, given: bool = False
) -> Job:
    """One expanded job of a checked spec, its adapters and image resolved to content hashes, keyed.
    `given`: use the URL and content hash each file carries (a producer's message), within the read
    policy, without reading it here: the worker checks the hash when it reads the file to render."""
    adapters = tuple(resolver.adapter(adapter, model, given) for adapter in spec.adapters)
    image = None if spec.image is None else resolver.input_image(spec.image, given)
    content = _content(spec, scale, seed, adapters, image)
    return Job.keyed(content, model)


@functools.lru_cache(maxsize=4096)
def _resolved(uri: str, weight: float, alpha: float | None, name: str | None, url: str, sha256: str) -> ResolvedAdapter:
    # Built once per distinct adapter term (frozen: every job that names it shares it), without a
    # second validation: JobSpec checked every field, the resolver found the rest.
    return ResolvedAdapter.model_construct(uri=uri, weight=weight, alpha=alpha, name=name, url=url, sha256=sha256)


def _content(spec: JobSpec, scale: float, seed: int, adapters: tuple, image: ResolvedImage | None) -> dict:
    """The fields of one job of a checked spec, for `Job.keyed`."""
    fields = {name: getattr(spec, name) for name in JobContent.model_fields if name not in _SET_HERE}
    return {**fields, "adapters": adapters, "image": image, "lora_scale": scale, "seed": seed}


_SET_HERE = {"adapters", "image", "lora_scale", "seed"}


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


def load_jobs(path: str, model_for, resolver: AdapterResolver, limits: JobLimits) -> list[Job]:
    """Every job of a .jsonl file, checked, expanded, resolved and keyed; raises JobFileError
    listing every bad line in line order, so nothing is enqueued unless the whole file is good.

    `model_for(alias)` gives the ModelInfo of a model alias (None: the fleet's default model)
    or raises ModelError; a model that cannot be read is one error for the whole file, and its
    lines are still checked against the schema. Each line's lists are counted before they are
    expanded: a line asking for millions of jobs is refused without building them.
    """
    errors: list[str] = []
    jobs: list[Job] = []
    models: dict = {}  # alias -> ModelInfo, or the ModelError it gave (asked once per file)
    expands_to = lines = 0
    for number, obj, error in read_job_lines(path, limits.max_jobs):
        lines += 1
        if error is not None:
            errors.append(error)
            continue
        where = f"line {number}"
        alias = obj.get("model") if isinstance(obj, dict) else None
        name = alias if isinstance(alias, str) or alias is None else json.dumps(alias)
        if name not in models:
            try:
                models[name] = model_for(alias)
            except ModelError as exc:
                models[name] = exc
                errors.append(f"{where}: model: {exc}" + (" (every line that names it)" if alias else " (every line)"))
        model = models[name]
        spec, problems = check_job(
            obj, where, None if isinstance(model, ModelError) else model, limits.max_video_pixels
        )
        if problems:  # and the adapters it names, so that one run shows every problem of the line
            errors.extend(problems + [f"{where}: {exc}" for exc in unreadable_adapters(obj, resolver)])
        if problems or isinstance(model, ModelError):
            continue
        expands_to += len(spec.lora_scale) * len(spec.seed)
        if expands_to > limits.max_jobs:
            continue  # counted, never expanded: the file is refused anyway
        try:
            jobs.extend(resolve_job(spec, scale, seed, model, resolver) for scale, seed in expand_job(spec))
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


def load_jobs_for(path: str, settings, store: Store) -> list[Job]:
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


def job_from_message(message, model: ModelInfo, resolver: AdapterResolver, max_video_pixels: int) -> Job:
    """The job a `lorafleet.render` message asks for, checked as strictly as a submitted line.

    Whoever can write to Redis can send one, so nothing in it is trusted that can be derived: the
    key is always computed here from the content, and a message whose own key differs is refused.
    A message from the producer carries each adapter's url and content hash (checked against the
    file when it is read); one from another client may leave them out, and they are resolved here.
    """
    spec, errors = check_job(message, "job", model, max_video_pixels)
    for field in ("lora_scale", "seed"):
        if not errors and len(getattr(spec, field)) != 1:
            errors.append(f"job: {field}: a message is one job, so a single value (submit expands lists)")
    if errors:
        raise JobError("; ".join(errors))
    ((scale, seed),) = expand_job(spec)
    given = spec.key
    if given is not None and not (len(given) == 64 and set(given) <= SHA256_HEX):
        raise JobError("job: key: must be the 64 hex digits of a SHA-256 (or left out)")
    files = [*spec.adapters, *([spec.image] if spec.image is not None else [])]
    resolved = all(isinstance(f.url, str) and isinstance(f.sha256, str) and len(f.sha256) == 64 for f in files)
    try:
        job = resolve_job(spec, scale, seed, model, resolver, given=resolved)
    except AdapterError as exc:
        raise JobError(f"job: {exc}") from None
    if given is not None and given != job.key:
        raise JobError(f"job: key: the message says {given} but its content hashes to {job.key}: refused")
    return job
