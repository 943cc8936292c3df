"""A sweep spec (YAML or JSON): prompts × adapter sets × lora_scale values × seeds, as jobs.

    name: nightly                      # batch name prefix (default "sweep"); the date is appended
    prompts: ["a cat walks", "a dog runs"]     # or  prompts_file: prompts.jsonl
                                       # image-to-video: [{prompt: "...", image: inputs/cat.png}, ...]
    adapter_sets:
      - [s3://loras/style]
      - [{uri: s3://loras/style, weight: 0.8}, s3://loras/subject]
    lora_scales: "0:1:0.25"            # or a list; 0 is always rendered, as the reference
    seeds: [1, 2]
    render: {steps: 30, num_frames: 49} # any other job field
    axes: {guidance_scale: [4, 6, 8]}  # more axes: any render field or negative_prompt, each a list
    priority: low                      # the default: interactive submits go first
    suggest: {clip_score_drop: 1.0, consistency_drop: 0.02}   # the suggested scale's tolerances
    moved: {clip_score: 1.0}            # --compare thresholds, by metric (defaults: MOVED)
    confirm: {model: 5b-fp8}           # a draft sweep (model: a draft tier): then render the suggested
                                       # scale and its neighbours in this exact model, side by side
    refine: {resolution: 0.05}         # then add scales next to the suggestion, round by round

Checked as strictly as a jobs file, in two steps: the spec's shape as a pydantic model (SweepSpec,
every field's problems at once), then what it asks of the model, the adapters and the limits (a
render size, an adapter's URI, an input image, the confirming alias). Errors name the place in the
spec (`adapter_sets[1][0].uri`). Jobs come out grouped by adapter combination and scale, so a
worker switches variants rarely.
"""

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError, model_serializer
from pydantic_core import PydanticCustomError

from common.errors import AdapterError, JobFileError, ModelError, quoted
from common.job import Job
from common.job_spec import (
    RENDER_FIELDS,
    SWEPT_FIELDS,
    AdapterItem,
    AdapterSpec,
    RenderFields,
    check_job,
    describe,
    expand_job,
    render_size,
    unknown_field,
)
from common.jobs_file import JobLimits, read_job_lines
from common.model import ModelInfo
from common.resolver import AdapterResolver, resolve_job


def _refused(message: str) -> PydanticCustomError:
    """A spec error whose text is the message itself (placed by `_placed`)."""
    return PydanticCustomError("spec", message)


def scale_range(text: str) -> list[float]:
    """lora_scale values of a "start:stop:step" range (stop included); ValueError where it is not
    one with finite ends, 0 < step and start ≤ stop, or has more than 1000 steps."""
    start, stop, step = (float(part) for part in text.split(":"))
    if not all(map(math.isfinite, (start, stop, step))) or step <= 0 or stop < start or (stop - start) / step > 1000:
        raise ValueError(text)
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(count)]


def _scales(value):
    if isinstance(value, str):
        try:
            return scale_range(value)
        except ValueError:
            raise _refused(f"{quoted(value)} is not start:stop:step with 0 < step and start ≤ stop") from None
    if not isinstance(value, list) or not value:
        raise _refused("must be a non-empty list or a start:stop:step range")
    return value


def _finite(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refused(f"must be a finite number, got {quoted(value)}")
    return float(value)


def _seeds(value):
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    ):
        raise _refused("must be a non-empty list of integers ≥ 0")
    return value


def _prompt_list(value):
    if not isinstance(value, list) or not value:
        raise _refused("must be a non-empty list")
    return value


def _path(value):
    if not isinstance(value, str):
        raise _refused(f"must be the path of a .jsonl file, got {quoted(value)}")
    return value


def _sets(value):
    if not isinstance(value, list) or not value or not all(isinstance(s, list) for s in value):
        raise _refused("must be a non-empty list of adapter lists")
    return value


def _plain_name(value):
    if not isinstance(value, str) or not value or "/" in value:
        raise _refused('must be a plain name (no "/")')
    return value


def _mapping(message: str, fields: set | None = None) -> BeforeValidator:
    """A mapping (of only `fields`, where given), or the error `message`."""

    def check(value):
        if not isinstance(value, dict) or (fields is not None and set(value) - fields):
            raise _refused(message)
        return value

    return BeforeValidator(check)


def _threshold(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise _refused(f"must be a finite number ≥ 0, got {quoted(value)}")
    return float(value)


def _resolution(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise _refused(f"must be a number > 0, got {quoted(value)}")
    return float(value)


def _rounds(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
        raise _refused(f"must be a whole number from 1 to 10, got {quoted(value)}")
    return value


Threshold = Annotated[float, BeforeValidator(_threshold)]


class Suggest(BaseModel):
    """The suggested scale of an adapter set is the largest whose mean CLIPScore is within
    clip_score_drop of scale 0's and whose mean consistency (CLIP's, else temporal SSIM) is within
    consistency_drop of scale 0's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_score_drop: Threshold = 1.0
    consistency_drop: Threshold = 0.02


class Moved(BaseModel):
    """--compare marks a cell whose number moved by more than this since the baseline night."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_score: Threshold = 1.0
    clip_consistency: Threshold = 0.02
    ssim_vs_base: Threshold = 0.02
    psnr_vs_base: Threshold = 1.0
    temporal_ssim: Threshold = 0.02


class Refine(BaseModel):
    """`refine: {resolution: 0.05, rounds: 4}`: after the grid, add scales between each set's
    suggestion and the scale above it that the rule turned down, halving the gap each round, until
    it is at most `resolution`, the two cannot be told apart, or `rounds` rounds were made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: Annotated[float, BeforeValidator(_resolution)] = 0.05
    rounds: Annotated[int, BeforeValidator(_rounds)] = 4


class Confirm(BaseModel):
    """`confirm: {model: ALIAS}` (ALIAS null or left out: the fleet's default model; `confirm: true`
    alike): the exact model a draft sweep's suggestion and its neighbours are rendered in again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None


SUGGEST = Suggest().model_dump()
MOVED = Moved().model_dump()


class SweepSpec(BaseModel):
    """A sweep spec as written (the module's docstring shows one): each field's shape, checked
    here; what depends on the model, the adapters and the settings' limits (a render size, an
    adapter's URI, an input image, the confirming alias) is checked by `load_sweep` against them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, BeforeValidator(_plain_name)] = "sweep"
    model: str | None = None
    prompts: Annotated[list[Any] | None, BeforeValidator(_prompt_list)] = None
    prompts_file: Annotated[str | None, BeforeValidator(_path)] = None
    adapter_sets: Annotated[list[list[Any]] | None, BeforeValidator(_sets)] = None  # required: see _shape
    lora_scales: Annotated[list[Annotated[float, BeforeValidator(_finite)]], BeforeValidator(_scales)] = [1.0]
    seeds: Annotated[list[int], BeforeValidator(_seeds)] = [0]
    render: Annotated[dict[str, Any], _mapping("must be a mapping of job fields")] = {}
    axes: Annotated[
        dict[str, Any],
        _mapping("must be a mapping of job fields to lists of values, such as {guidance_scale: [4, 6]}"),
    ] = {}
    priority: Literal["high", "normal", "low"] = "low"  # a nightly sweep yields to interactive jobs
    suggest: Annotated[Suggest, _mapping(f"must be a mapping such as {json.dumps(SUGGEST)}")] = Suggest()
    moved: Annotated[Moved, _mapping(f"must be a mapping such as {json.dumps(MOVED)}")] = Moved()
    confirm: Annotated[  # (before-validators run last first: `true` becomes {} before the mapping check)
        Confirm | None,
        _mapping("must be a mapping such as {model: 5b-fp8} (the exact model alias; none: the default)", {"model"}),
        BeforeValidator(lambda value: {} if value is True else value),
    ] = None
    refine: Annotated[
        Refine | None, _mapping("must be a mapping such as {resolution: 0.05, rounds: 4}", {"resolution", "rounds"})
    ] = None


SECTIONS = {"suggest": Suggest, "moved": Moved, "refine": Refine, "confirm": Confirm}


def _shape(written: dict) -> tuple[SweepSpec, list[str], set[str]]:
    """A spec's shape, checked: the spec, its problems, and the fields that had them. Those fields
    then hold their defaults, so that the rest is still checked against the model in the same pass
    and every problem is named at once. A spec without adapter sets is refused with that field's
    own message (None is validated)."""
    try:
        return SweepSpec.model_validate({"adapter_sets": None, **written}), [], set()
    except ValidationError as exc:
        failed = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
        kept = {field: value for field, value in written.items() if field not in failed}
        return SweepSpec.model_validate(kept), _placed(exc), failed


def _placed(exc: ValidationError) -> list[str]:
    """Each error of a spec's validation as "place: message" (`lora_scales[2]: ...`, `spec: unknown
    field ...`)."""
    found = []
    for error in exc.errors():
        loc, kind = error["loc"], error["type"]
        if kind == "extra_forbidden":
            owner, where = (SECTIONS[loc[0]], loc[0]) if len(loc) > 1 else (SweepSpec, "spec")
            found.append(f"{where}: {unknown_field(str(loc[-1]), list(owner.model_fields))}")
            continue
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
        if kind == "spec":
            message = error["msg"]
        elif kind == "literal_error":
            message = f"must be one of {error['ctx']['expected']}"
        else:
            message = f"{error['msg'][0].lower()}{error['msg'][1:]}, got {quoted(error.get('input'))}"
        found.append(f"{where}: {message}")
    return list(dict.fromkeys(found))


ADAPTER_LIST = TypeAdapter(list[AdapterItem])


class Cell(BaseModel):
    """Where a sweep's job sits: its adapter set and prompt (their places in the spec), seed and
    lora_scale, its values on the further axes (`axes:`), the refining round that added it, and its
    tier ("exact": a draft night's confirmation). Written as report.json has always held it: axes,
    refined and tier only where they have a value."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    set: int
    prompt: int
    seed: int
    lora_scale: float
    axes: dict[str, Any] = {}
    refined: int | None = None
    tier: Literal["exact"] | None = None

    @property
    def section(self) -> tuple[int, str]:
        """The report section it belongs to: its adapter set at its combination of the further axes."""
        return self.set, axes_id(self.axes)

    @model_serializer(mode="wrap")
    def _written(self, write) -> dict:
        data = write(self)
        for name in ("axes", "refined", "tier"):
            if not data.get(name):
                data.pop(name, None)
        return data


def _prompts(spec: SweepSpec, model: ModelInfo, resolver: AdapterResolver, max_jobs: int, errors: list) -> list[dict]:
    """The spec's prompts, or its prompts_file's, each checked (an image where the model takes one)."""
    if (spec.prompts is None) == (spec.prompts_file is None):
        errors.append("prompts: give either prompts (a list) or prompts_file (a .jsonl), not both or neither")
        return []
    if spec.prompts is not None:
        items, where = spec.prompts, "prompts"
    else:
        where = spec.prompts_file
        # As a jobs file is read: a regular file only, as a stream, at most max_jobs lines, each named.
        items = []
        try:
            for _, item, problem in read_job_lines(where, max_jobs):
                if problem is not None:
                    errors.append(f"prompts_file: {where}: {problem}")
                else:
                    items.append(item)
        except JobFileError as exc:
            errors.extend(f"prompts_file: cannot read {where}: {error}" for error in exc.errors)
            return []
    prompts = []
    for i, item in enumerate(items):
        item = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            errors.append(
                f'{where}[{i}]: must be a prompt string or {{"prompt": ..., "negative_prompt": ..., "image": ...}}'
            )
            continue
        extra = set(item) - {"prompt", "negative_prompt", "image"}
        if extra:
            errors.append(f"{where}[{i}]: {unknown_field(sorted(extra)[0], ['prompt', 'negative_prompt', 'image'])}")
            continue
        image = item.get("image")
        if model.takes_image and image is None:
            errors.append(f"{where}[{i}].image: required: this model turns an image into a video")
        elif image is not None and not model.takes_image:
            errors.append(f"{where}[{i}].image: this model is text-to-video and takes no image")
        elif image is not None:
            try:
                resolver.image(image if isinstance(image, str) else str(image.get("uri")))
            except (AdapterError, AttributeError) as exc:
                errors.append(f"{where}[{i}].image: {exc if isinstance(exc, AdapterError) else 'must be a URI string'}")
        prompts.append(item)
    return prompts


def load_sweep(
    path: str, model_for, resolver: AdapterResolver, limits: JobLimits
) -> tuple[str, list[Job], list[Cell], dict]:
    """The sweep's batch name prefix, its jobs (checked, resolved and keyed), each job's cell and
    the report's settings ({"suggest", "moved", "confirm"}, defaults filled in); raises
    JobFileError naming every problem's place in the spec, before anything is enqueued."""
    sweep = _read_sweep(path, model_for, resolver, limits)
    scales = {(i, axes_id(axes)): sweep.scales for i in range(len(sweep.sets)) for axes in sweep.combinations()}
    jobs, cells = _expand(sweep, sweep.spec.model, sweep.model, scales, resolver, limits)
    return sweep.spec.name, jobs, cells, sweep.report


def more_cells(
    path: str,
    model_for,
    resolver: AdapterResolver,
    limits: JobLimits,
    scales: dict[tuple[int, str], list[float]],
    mark: dict,
    exact: bool = False,
) -> tuple[list[Job], list[Cell]]:
    """A sweep's further cells (a refining or confirming round): each adapter set, at each
    combination of its further axes, at `scales[(set, axes_id)]` (a report section's own scales),
    every prompt and seed, each cell marked with `mark` ({"refined": round}, {"tier": "exact"}); in
    the sweep's own model, or, `exact`, in the exact model its `confirm:` names. The resolver reads
    each adapter once across rounds."""
    sweep = _read_sweep(path, model_for, resolver, limits)
    alias = sweep.report["confirm"]["model"] if exact else sweep.spec.model
    jobs, cells = _expand(sweep, alias, model_for(alias) if exact else sweep.model, scales, resolver, limits)
    return jobs, [cell.model_copy(update=mark) for cell in cells]


@dataclass
class _Sweep:
    """A spec's parts, each checked against the model, the adapters and the limits."""

    path: str
    spec: SweepSpec
    model: ModelInfo
    prompts: list[dict]
    scales: list[float]
    render: dict
    sets: list[list[dict]]
    axes: dict[str, list]
    report: dict

    def combinations(self) -> list[dict]:
        """Each combination of the further axes, as a cell's `axes` ({} with none)."""
        names = list(self.axes)
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*self.axes.values())]


def _read_sweep(path: str, model_for, resolver: AdapterResolver, limits: JobLimits) -> _Sweep:
    """A spec checked: its shape (SweepSpec), then what it asks of the model, the adapters and the
    limits, in one pass that names every problem at once."""
    written = read_spec(path)
    try:
        model: ModelInfo = model_for(written.get("model"))
    except ModelError as exc:
        raise JobFileError(path, [f"model: {exc}"]) from None
    spec, errors, failed = _shape(written)
    prompts = [] if failed & {"prompts", "prompts_file"} else _prompts(spec, model, resolver, limits.max_jobs, errors)
    scales = spec.lora_scales if 0.0 in spec.lora_scales else [0.0, *spec.lora_scales]  # the reference of every cell
    render = _render(spec.render, model, limits, errors)
    sets = _adapter_sets(spec.adapter_sets, resolver, errors)
    axes = _axes(spec.axes, render, model, limits, errors)
    cell_count = len(sets) * len(scales) * len(prompts) * len(spec.seeds) * math.prod(len(v) for v in axes.values())
    if cell_count > limits.max_jobs:
        errors.append(f"the sweep expands to {cell_count} cells, more than {limits.max_jobs} (LORAFLEET_MAX_JOBS)")
    confirm = _confirm(spec, model_for, errors)
    if errors:
        raise JobFileError(path, list(dict.fromkeys(errors)))
    report = {
        "suggest": spec.suggest.model_dump(),
        "moved": spec.moved.model_dump(),
        "confirm": confirm,
        "refine": spec.refine and spec.refine.model_dump(),
    }
    return _Sweep(path, spec, model, prompts, scales, render, sets, axes, report)


def _expand(
    sweep: _Sweep, alias, model: ModelInfo, scales: dict[int, list[float]], resolver: AdapterResolver, limits
) -> tuple[list[Job], list[Cell]]:
    """The jobs and cells of each adapter set, at each combination of the further axes, at its
    scales `scales[(set, axes_id)]`, in model `alias`: grouped by adapter combination and scale, so a
    worker switches variants rarely."""
    jobs, cells = [], []
    combinations = [(a, axes, axes_id(axes)) for a, axes in enumerate(sweep.combinations())]
    for i, adapters in enumerate(sweep.sets):
        at = {place: scales.get((i, place), []) for _, _, place in combinations}
        for scale in dict.fromkeys(x for xs in at.values() for x in xs):  # one variant switch per group
            for (a, axes, place), (p, prompt) in itertools.product(combinations, enumerate(sweep.prompts)):
                if scale not in at[place]:
                    continue
                for seed in sweep.spec.seeds:
                    fields = {**sweep.render, **axes, **prompt, "adapters": adapters, "lora_scale": scale, "seed": seed}
                    spec_of_cell, problems = check_job(
                        {
                            **fields,
                            "model": alias,
                            "priority": sweep.spec.priority,
                            "id": f"set{i}-p{p}-s{seed}" + (f"-a{a}" if axes else ""),
                        },
                        f"adapter_sets[{i}]",
                        model,
                        limits.max_video_pixels,
                    )
                    if problems:  # each part was checked above; what is left is how they combine
                        raise JobFileError(sweep.path, problems)
                    ((scale_of_cell, seed_of_cell),) = expand_job(spec_of_cell)
                    try:
                        jobs.append(resolve_job(spec_of_cell, scale_of_cell, seed_of_cell, model, resolver))
                    except AdapterError as exc:
                        raise JobFileError(sweep.path, [f"adapter_sets[{i}]: {exc}"]) from None
                    cells.append(Cell(set=i, prompt=p, seed=seed, lora_scale=scale, axes=axes))
    return jobs, cells


def axes_id(axes: Mapping | None) -> str:
    """Values on a spec's further axes (a cell's or a report section's `axes`), as one comparable
    string ("" for none)."""
    return json.dumps(axes, sort_keys=True) if axes else ""


AXIS_FIELDS = [*RENDER_FIELDS, "negative_prompt"]  # what `axes:` may sweep beside the spec's own axes


def _axes(axes: dict, render: dict, model: ModelInfo, limits: JobLimits, errors: list) -> dict[str, list]:
    """`axes: {field: [values]}`: more axes than adapter sets, scales, prompts and seeds, each value
    checked as `render:` checks it (a field both in `render:` and here is an error)."""
    checked = {}
    for field, values in axes.items():
        if field not in AXIS_FIELDS:
            errors.append(f"axes: {unknown_field(str(field), AXIS_FIELDS)}")
        elif field in render:
            errors.append(f"axes.{field}: also set in render: give it in one place")
        elif not isinstance(values, list) or not values or len(values) != len({json.dumps(v) for v in values}):
            errors.append(f"axes.{field}: must be a non-empty list of distinct values")
        else:
            before = len(errors)
            for j, value in enumerate(values):
                if field == "negative_prompt":
                    if not isinstance(value, str):
                        errors.append(f"axes.{field}[{j}]: must be a string")
                    continue
                at = len(errors)
                _render({**render, field: value}, model, limits, errors)
                errors[at:] = [e.replace(f"render.{field}", f"axes.{field}[{j}]", 1) for e in errors[at:]]
            if len(errors) == before:
                checked[field] = values
    return checked


def _confirm(spec: SweepSpec, model_for, errors: list) -> dict | None:
    """`confirm:`'s alias, checked: an exact model, not the sweep's own (the draft)."""
    if spec.confirm is None:
        return None
    alias = spec.confirm.model
    if alias == spec.model:
        errors.append("confirm.model: must differ from the sweep's own model (the draft): confirm renders exactly")
        return None
    try:
        exact = model_for(alias)
    except ModelError as exc:
        errors.append(f"confirm.model: {exc}")
        return None
    if exact.cache:
        errors.append(f"confirm.model: {alias} is a draft tier itself: name an exact one")
        return None
    return {"model": alias}


MAX_SPEC_VALUES = 100_000  # a spec's values once its YAML aliases are expanded: a real one has hundreds


def read_spec(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            spec = load_bounded_yaml(f)  # JSON is YAML too
    except RecursionError:
        raise JobFileError(path, ["not a readable YAML or JSON sweep spec: nested too deeply"]) from None
    except (OSError, yaml.YAMLError) as exc:
        raise JobFileError(path, [f"not a readable YAML or JSON sweep spec: {exc}"]) from None
    if not isinstance(spec, dict):
        raise JobFileError(path, ["a sweep spec must be a mapping with prompts, adapter_sets, lora_scales, seeds"])
    return spec


def load_bounded_yaml(stream):
    """yaml.safe_load, refusing a document whose aliases expand to more than MAX_SPEC_VALUES values
    (a few hundred bytes of nested aliases make 10⁸: every later step would walk them all). The
    size is counted on the composed nodes, where an alias is a reference, before any is expanded."""
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is not None and expanded_size(node, {}) > MAX_SPEC_VALUES:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_SPEC_VALUES} values")
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values a node holds once every alias in it is expanded (memoized by node: an alias
    is the same node again); a node that holds itself counts as too many."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_SPEC_VALUES + 1  # while counting: a node met again inside itself is a cycle
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(expanded_size(key, sizes) + expanded_size(value, sizes) for key, value in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(expanded_size(item, sizes) for item in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


def _render(render: dict, model: ModelInfo, limits: JobLimits, errors: list) -> dict:
    """The `render:` mapping, checked as job fields (RenderFields) and against the model's rules."""
    swept = [field for field in render if field in SWEPT_FIELDS]
    errors.extend(f"render.{field}: set by the sweep itself" for field in swept)
    given = {field: value for field, value in render.items() if field not in swept}
    try:
        checked = RenderFields.model_validate(given).model_dump()
    except ValidationError as exc:
        errors.extend(
            f"render.{field}: {message}" if field else f"render: {message}"
            for field, message in describe(exc, given, RenderFields)
        )
        return {}
    _, problems = render_size(checked["num_frames"], checked["height"], checked["width"], model, limits.max_video_pixels)
    errors.extend(f"render.{field}: {problem}" for field, problem in problems)
    return given


def _adapter_sets(sets: list[list] | None, resolver: AdapterResolver, errors: list) -> list[list[dict]]:
    """Each adapter set, checked as a job's `adapters` (AdapterSpec) and read once."""
    checked = []
    for i, adapters in enumerate(sets or []):
        try:
            checked.append([a.model_dump(exclude_none=True) for a in ADAPTER_LIST.validate_python(adapters)])
        except ValidationError as exc:
            errors.extend(f"adapter_sets[{i}]{field}: {message}" for field, message in describe(exc, {}, AdapterSpec))
            continue
        for j, adapter in enumerate(checked[-1]):
            try:
                resolver.resolve(adapter["uri"])
            except AdapterError as exc:
                errors.append(f"adapter_sets[{i}][{j}].uri: {exc}")
    return checked
