"""A sweep spec checked against what it asks of (the model's rules, the adapters, the input images,
the confirming alias, the settings' limits) and expanded to jobs and cells, the grid a sweep
renders: prompts × adapter sets × lora_scale values × seeds × further axes, and the refining and
confirming rounds' cells. Checked as strictly as a jobs file, in one pass that names every problem
at its place in the spec (`adapter_sets[1][0].uri`). Jobs come out grouped by adapter combination
and scale, so a worker switches variants rarely. The spec's shape is common/sweep_spec.py's.
"""

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, model_serializer

from common.errors import AdapterError, JobFileError, ModelError
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
from common.sweep_spec import SweepSpec, check_shape, read_spec

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
    spec, errors, failed = check_shape(written)
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
