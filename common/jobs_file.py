"""From what a user or a client wrote to Jobs (common/job.py): a jobs file's lines, a
`lorafleet.render` message (a sweep's cells: common/sweep_grid.py). Each goes through three steps,
on the producer or, for a message, on the worker: check it against the schema and the model's rules
and expand its lists (common/job_spec.py), resolve its adapters and image and key it
(common/resolver.py). `load_jobs` does all three for a whole file and raises every error at once,
each naming its line and field.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass

from common.errors import AdapterError, JobError, JobFileError, ModelError
from common.job import Job
from common.job_spec import check_job, expand_job
from common.model import ModelInfo, model_resolver
from common.reading import open_regular_file
from common.resolver import AdapterResolver, resolve_job
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


def load_jobs(
    path: str, model_for, resolver: AdapterResolver, limits: JobLimits, priority: str | None = None
) -> list[Job]:
    """Every job of a .jsonl file, checked, expanded, resolved and keyed, at its line's priority or
    `priority`; raises JobFileError listing every bad line in line order, so nothing is enqueued
    unless the whole file is good.

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
            jobs.extend(
                resolve_job(spec, scale, seed, model, resolver, priority=priority) for scale, seed in expand_job(spec)
            )
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


def load_jobs_for(path: str, settings, store: Store, priority: str | None = None) -> list[Job]:
    """`load_jobs` as the settings say: the fleet's models, the adapter read policy, the limits."""
    return load_jobs(
        path,
        model_resolver(settings),
        AdapterResolver.from_settings(settings, store),
        JobLimits.from_settings(settings),
        priority,
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
