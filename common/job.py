"""The job: its schema (DESIGN.md's table), validation with line-numbered errors, expansion, key.

A job goes through three steps, on the producer or, for a message without a key, on the worker:
check it (`check_job`), expand its lists (`expand_job`), resolve its adapters and key it
(`finish_job`). `load_jobs` does all three for a whole file and raises every error at once.
"""

import difflib
import hashlib
import json
import math
import secrets

from common.adapters import AdapterFile, read_adapter
from common.errors import AdapterError, JobError, JobFileError, ModelError
from common.lora_formats import check_shapes, detect_layout
from common.model import ModelInfo
from common.store import Store

# Field -> default; None under a render size means "the model's own".
DEFAULTS = {
    "prompt": None,
    "negative_prompt": "",
    "adapters": [],
    "lora_scale": 1.0,
    "seed": None,
    "num_frames": None,
    "height": None,
    "width": None,
    "steps": 50,
    "guidance_scale": 6.0,
    "use_dynamic_cfg": False,
    "fps": 8,
    "fuse": True,
    "model": None,
    "id": None,
}
ADAPTER_DEFAULTS = {"uri": None, "weight": 1.0, "alpha": None, "name": None}
# Fields the producer fills in; a message from another Celery client may carry them too.
RESOLVED_FIELDS = {"key", "batch"}
RESOLVED_ADAPTER_FIELDS = {"url", "sha256"}
MAX_SEED = 2**63 - 1
MAX_PIXELS_SIDE = 8192
MAX_FRAMES = 1025


def _unknown(field: str, known, where: str) -> str:
    guess = difflib.get_close_matches(field, list(known), n=1)
    hint = f' (did you mean "{guess[0]}"?)' if guess else ""
    return f'{where}: unknown field "{field}"{hint}'


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value, field: str, where: str, errors: list, low=None, high=None) -> float | None:
    if not _is_number(value):
        errors.append(f"{where}: {field}: must be a number, got {json.dumps(value)}")
        return None
    if not math.isfinite(value):
        errors.append(f"{where}: {field}: must be a finite number, got {value}")
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        errors.append(f"{where}: {field}: must be between {low} and {high}, got {value}")
        return None
    return float(value)


def _integer(value, field: str, where: str, errors: list, low: int, high: int) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool):
        errors.append(f"{where}: {field}: must be an integer, got {json.dumps(value)}")
        return None
    if not low <= value <= high:
        errors.append(f"{where}: {field}: must be between {low} and {high}, got {value}")
        return None
    return value


def _one_or_list(value, field: str, where: str, errors: list, check) -> list:
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        errors.append(f"{where}: {field}: an empty list renders nothing")
    checked = [check(v, f"{field}[{i}]" if isinstance(value, list) else field) for i, v in enumerate(values)]
    return [v for v in checked if v is not None]


def _check_adapters(value, where: str, errors: list) -> list[dict]:
    if not isinstance(value, list):
        errors.append(f"{where}: adapters: must be a list of adapters, got {json.dumps(value)}")
        return []
    adapters = []
    for i, item in enumerate(value):
        field = f"adapters[{i}]"
        if isinstance(item, str):
            item = {"uri": item}
        if not isinstance(item, dict):
            errors.append(f'{where}: {field}: must be a URI string or {{"uri": ..., "weight": ...}}')
            continue
        for name in item:
            if name not in ADAPTER_DEFAULTS and name not in RESOLVED_ADAPTER_FIELDS:
                errors.append(_unknown(name, ADAPTER_DEFAULTS, f"{where}: {field}"))
        adapter = {**ADAPTER_DEFAULTS, **item}
        if not isinstance(adapter["uri"], str) or not adapter["uri"].strip():
            errors.append(f"{where}: {field}.uri: must be a non-empty string")
        adapter["weight"] = _number(adapter["weight"], f"{field}.weight", where, errors)
        if adapter["alpha"] is not None:
            adapter["alpha"] = _number(adapter["alpha"], f"{field}.alpha", where, errors, low=1e-6, high=1e6)
        if adapter["name"] is not None and not isinstance(adapter["name"], str):
            errors.append(f"{where}: {field}.name: must be a string")
        adapters.append(adapter)
    return adapters


def check_job(obj, where: str, model: ModelInfo) -> tuple[dict, list[str]]:
    """Check one job against the schema and the model's rules; returns it with defaults filled in,
    and the list of errors (each starting with `where`, e.g. "line 3")."""
    errors: list[str] = []
    if not isinstance(obj, dict):
        return {}, [f"{where}: a job must be a JSON object, got {type(obj).__name__}"]
    for field in obj:
        if field not in DEFAULTS and field not in RESOLVED_FIELDS:
            errors.append(_unknown(field, DEFAULTS, where))
    job = {**DEFAULTS, **{k: v for k, v in obj.items() if k in DEFAULTS}}

    if not isinstance(job["prompt"], str) or not job["prompt"].strip():
        errors.append(f"{where}: prompt: required, a non-empty string")
    if not isinstance(job["negative_prompt"], str):
        errors.append(f"{where}: negative_prompt: must be a string")
    job["adapters"] = _check_adapters(job["adapters"], where, errors)
    job["lora_scale"] = _one_or_list(
        job["lora_scale"], "lora_scale", where, errors, lambda v, f: _number(v, f, where, errors)
    )
    if job["seed"] is None:
        job["seed"] = secrets.randbelow(2**32)  # drawn once, then written into the job
    job["seed"] = _one_or_list(
        job["seed"], "seed", where, errors, lambda v, f: _integer(v, f, where, errors, 0, MAX_SEED)
    )
    for field, default, high in (
        ("num_frames", model.num_frames, MAX_FRAMES),
        ("height", model.height, MAX_PIXELS_SIDE),
        ("width", model.width, MAX_PIXELS_SIDE),
    ):
        job[field] = default if job[field] is None else _integer(job[field], field, where, errors, 1, high)
    if None not in (job["num_frames"], job["height"], job["width"]):
        for field, problem in model.check_size(job["num_frames"], job["height"], job["width"]):
            errors.append(f"{where}: {field}: {problem}, got {job[field]}")
    job["steps"] = _integer(job["steps"], "steps", where, errors, 1, 1000)
    job["guidance_scale"] = _number(job["guidance_scale"], "guidance_scale", where, errors, 0, 100)
    job["fps"] = _integer(job["fps"], "fps", where, errors, 1, 120)
    for field in ("use_dynamic_cfg", "fuse"):
        if not isinstance(job[field], bool):
            errors.append(f"{where}: {field}: must be true or false, got {json.dumps(job[field])}")
    if job["model"] is not None and not isinstance(job["model"], str):
        errors.append(f"{where}: model: must be a model alias (a string)")
    if job["id"] is not None:
        if not isinstance(job["id"], str) or len(job["id"]) > 256:
            errors.append(f"{where}: id: must be a string of at most 256 characters")
        elif any(part in job["id"] for part in ("/", "\\", "..")) or not job["id"].isprintable():
            errors.append(
                f'{where}: id: must not contain "/", "\\", ".." or control characters (an id is a label, never a path)'
            )
    return job, errors


def expand_job(job: dict) -> list[dict]:
    """One job per (lora_scale, seed) pair of a checked job's lists."""
    return [{**job, "lora_scale": scale, "seed": seed} for scale in job["lora_scale"] for seed in job["seed"]]


def job_key(job: dict, model: ModelInfo) -> str:
    """The SHA-256 of everything that decides the output: the same job always gets the same key."""
    decisive = {
        "model": model.ref,
        "scheduler": model.scheduler,
        # At lora_scale 0 no adapter touches a pixel: every combination shares the base's key and video.
        "adapters": sorted(
            (
                {"sha256": a["sha256"], "weight": float(a["weight"]), "alpha": a["alpha"]}
                for a in job["adapters"]
                if job["lora_scale"] != 0
            ),
            key=lambda a: json.dumps(a, sort_keys=True),
        ),
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
    canonical = json.dumps(decisive, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class AdapterResolver:
    """Resolves adapter URIs to files, reading each distinct URI once per resolver."""

    def __init__(self, store: Store | None):
        self.store = store
        self._seen: dict[str, AdapterFile | AdapterError] = {}

    def resolve(self, uri: str) -> AdapterFile:
        """The adapter file a URI means; raises AdapterError naming what was checked."""
        if uri not in self._seen:
            try:
                self._seen[uri] = read_adapter(uri, self.store)[0]
            except AdapterError as exc:
                self._seen[uri] = exc
        found = self._seen[uri]
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
    finished["key"] = job_key(finished, model)
    return finished


def prepare_job(obj: dict, where: str, model: ModelInfo, resolver: AdapterResolver) -> list[dict]:
    """Check, expand and finish one job object; raises JobError with every problem found."""
    job, errors = check_job(obj, where, model)
    if errors:
        raise JobError("\n".join(errors))
    try:
        return [finish_job(one, model, resolver) for one in expand_job(job)]
    except AdapterError as exc:
        raise JobError(f"{where}: {exc}") from None


def read_job_lines(path: str, max_jobs: int) -> tuple[list[tuple[int, object]], list[str]]:
    """The JSON objects of a .jsonl file by line number, and an error for each line that is not JSON;
    stops with one error past `max_jobs` lines."""
    objects, errors = [], []
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise JobFileError(path, [f"cannot open: {exc.strerror}"]) from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                errors.append(f"line {number}: not UTF-8 text")
                continue
            if not line.strip():
                continue
            if len(objects) + len(errors) >= max_jobs:
                errors.append(f"line {number}: more than {max_jobs} jobs in one file (LORAFLEET_MAX_JOBS): split it")
                break
            try:
                objects.append((number, json.loads(line)))
            except ValueError as exc:
                errors.append(f"line {number}: not valid JSON ({exc.args[0].split(':')[0]})")
    return objects, errors


def load_jobs(path: str, model_for, store: Store | None, max_jobs: int = 100_000) -> list[dict]:
    """Every job of a .jsonl file, checked, expanded, resolved and keyed; raises JobFileError
    listing every bad line, so nothing is enqueued unless the whole file is good.

    `model_for(alias)` gives the ModelInfo of a model alias (None: the fleet's default model)
    or raises ModelError.
    """
    objects, errors = read_job_lines(path, max_jobs)
    if not objects and not errors:
        errors.append("no jobs: the file is empty")
    resolver = AdapterResolver(store)
    jobs = []
    for number, obj in objects:
        where = f"line {number}"
        try:
            model = model_for(obj.get("model") if isinstance(obj, dict) else None)
            jobs.extend(prepare_job(obj, where, model, resolver))
        except ModelError as exc:
            errors.append(f"{where}: model: {exc}")
        except JobError as exc:
            errors.extend(str(exc).splitlines())
    if len(jobs) > max_jobs and not errors:
        errors.append(f"the file expands to {len(jobs)} jobs, more than {max_jobs} (LORAFLEET_MAX_JOBS): split it")
    if errors:
        raise JobFileError(path, errors)
    return jobs


def job_from_message(message, model: ModelInfo, resolver: AdapterResolver) -> dict:
    """The job a `lorafleet.render` message asks for, checked as strictly as a submitted line.

    A message from the producer carries its key and resolved adapters; one from another Celery
    client may leave them out, and they are filled in here.
    """
    job, errors = check_job(message, "job", model)
    for field in ("lora_scale", "seed"):
        if not errors and len(job[field]) != 1:
            errors.append(f"job: {field}: a message is one job, so a single value (submit expands lists)")
    if errors:
        raise JobError("; ".join(errors))
    (job,) = expand_job(job)
    batch = message.get("batch")
    if batch is not None and not isinstance(batch, str):
        raise JobError("job: batch: must be a batch name (a string)")
    job["batch"] = batch
    key = message.get("key")
    if key is None:
        try:
            return finish_job(job, model, resolver)
        except AdapterError as exc:
            raise JobError(f"job: {exc}") from None
    if not (isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdef" for c in key)):
        raise JobError("job: key: must be the 64 hex digits of a SHA-256 (or left out)")
    for i, adapter in enumerate(job["adapters"]):
        if not (isinstance(adapter.get("url"), str) and isinstance(adapter.get("sha256"), str)):
            raise JobError(f"job: adapters[{i}]: a message with a key needs each adapter's url and sha256")
    return {**job, "key": key}
