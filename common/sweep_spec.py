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

Here, what a spec is: its shape as pydantic models (SweepSpec and its sections), read from YAML
with its aliases bounded; each problem named at its place (`refine.rounds`, `lora_scales[2]`).
What it asks of the model, the adapters and the limits, and the jobs and cells it expands to, are
common/sweep_grid.py's.
"""

import json
import math
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from common.errors import JobFileError, quoted
from common.job_spec import unknown_field


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


def _rule(holds, message: str, got: bool = False) -> BeforeValidator:
    """A field's value as written where `holds(value)`; else the spec error `message` (followed by
    the value, quoted, where `got`)."""

    def check(value):
        if not holds(value):
            raise _refused(f"{message}, got {quoted(value)}" if got else message)
        return value

    return BeforeValidator(check)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    try:
        return _number(value) and math.isfinite(value)
    except OverflowError:  # an integer beyond any float (JSON and YAML can write one)
        return False


def _mapping(message: str, fields: set | None = None) -> BeforeValidator:
    """A mapping (of only `fields`, where given), or the error `message`."""
    return _rule(lambda value: isinstance(value, dict) and (fields is None or set(value) <= fields), message)


# Each field's rule, and what a spec that breaks it is told (tests/unit/test_sweep_spec.py pins them).
FINITE = _rule(_finite, "must be a finite number", got=True)
THRESHOLD = _rule(lambda v: _finite(v) and v >= 0, "must be a finite number ≥ 0", got=True)
POSITIVE = _rule(lambda v: _finite(v) and v > 0, "must be a number > 0", got=True)
ROUNDS = _rule(
    lambda v: _number(v) and isinstance(v, int) and 1 <= v <= 10, "must be a whole number from 1 to 10", got=True
)
PLAIN_NAME = _rule(lambda v: isinstance(v, str) and v and "/" not in v, 'must be a plain name (no "/")')
NON_EMPTY_LIST = _rule(lambda v: isinstance(v, list) and v, "must be a non-empty list")
JSONL_PATH = _rule(lambda v: isinstance(v, str), "must be the path of a .jsonl file", got=True)
ADAPTER_LISTS = _rule(
    lambda v: isinstance(v, list) and v and all(isinstance(s, list) for s in v),
    "must be a non-empty list of adapter lists",
)
SEEDS = _rule(
    lambda v: isinstance(v, list) and v and all(_number(s) and isinstance(s, int) and s >= 0 for s in v),
    "must be a non-empty list of integers ≥ 0",
)
Threshold = Annotated[float, THRESHOLD]


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

    resolution: Annotated[float, POSITIVE] = 0.05
    rounds: Annotated[int, ROUNDS] = 4


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

    name: Annotated[str, PLAIN_NAME] = "sweep"
    model: str | None = None
    prompts: Annotated[list[Any] | None, NON_EMPTY_LIST] = None
    prompts_file: Annotated[str | None, JSONL_PATH] = None
    adapter_sets: Annotated[list[list[Any]] | None, ADAPTER_LISTS] = None  # required: see check_shape
    lora_scales: Annotated[list[Annotated[float, FINITE]], BeforeValidator(_scales)] = [1.0]
    seeds: Annotated[list[int], SEEDS] = [0]
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


def check_shape(written: dict) -> tuple[SweepSpec, list[str], set[str]]:
    """A spec's shape, checked: the spec, its problems, and the fields that had them. Those fields
    then hold their defaults, so that the rest is still checked against the model in the same pass
    and every problem is named at once. A spec without adapter sets is refused with that field's
    own message (None is validated)."""
    try:
        return SweepSpec.model_validate({"adapter_sets": None, **written}), [], set()
    except ValidationError as exc:
        failed = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
        kept = {field: value for field, value in written.items() if isinstance(field, str) and field not in failed}
        return SweepSpec.model_validate(kept), _placed(exc), failed


def _placed(exc: ValidationError) -> list[str]:
    """Each error of a spec's validation as "place: message" (`lora_scales[2]: ...`, `spec: unknown
    field ...`)."""
    found = []
    for error in exc.errors():
        loc, kind = error["loc"], error["type"]
        if kind in ("extra_forbidden", "invalid_key"):  # a name no field has, or not a name at all (YAML: `5: x`)
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
