"""The job as one typed model (pydantic): every field a user may write, its type, default and
bounds, and the model's JSON Schema for other Celery clients (`lorafleet schema`); then what
depends on the model being rendered (its default size, its frame and size rules, `check_job`) and
the jobs a spec's lists stand for (`expand_job`).

Errors come out as `(location, message)`, with locations in the form users write them:
`adapters[1].weight`, `lora_scale[2]`.
"""

import difflib
import math
import secrets
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from common.errors import quoted
from common.model import ModelInfo
from common.protocol import BATCH_NAME, BATCH_NAME_RULE

MAX_SEED = 2**63 - 1
MAX_PIXELS_SIDE = 8192
MAX_FRAMES = 1025
# T5 reads 226 tokens of a prompt (about 1,000 characters); anything much longer is a mistake.
MAX_PROMPT_CHARS = 2000
MAX_ADAPTERS = 16


def between(low, high) -> AfterValidator:
    """A bound on both sides, said as one sentence."""

    def check(value):
        if not low <= value <= high:
            raise PydanticCustomError("between", "must be between {low} and {high}", {"low": low, "high": high})
        return value

    return AfterValidator(check)


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")  # JSON can carry a lone surrogate, which no encoder takes
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "surrogate", "holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text"
        ) from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "required, a non-empty string")
    return value


def _label(value: str) -> str:
    if any(part in value for part in ("/", "\\", "..")) or not value.isprintable():
        raise PydanticCustomError(
            "label", 'must not contain "/", "\\", ".." or control characters (an id is a label, never a path)'
        )
    return value


def _batch_name(value: str) -> str:
    if not BATCH_NAME.fullmatch(value):
        raise PydanticCustomError("batch_name", BATCH_NAME_RULE)
    return value


def _one_or_list(value):
    return value if isinstance(value, list) else [value]


def _uri_or_adapter(value):
    return {"uri": value} if isinstance(value, str) else value


Text = Annotated[str, AfterValidator(_unicode)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class AdapterSpec(BaseModel):
    """One adapter of a job: where its file is, and how strongly it applies."""

    model_config = ConfigDict(extra="forbid", strict=True)

    uri: Annotated[Text, Field(min_length=1, max_length=4096), AfterValidator(_not_blank)] = Field(
        description="a local path (a folder holding pytorch_lora_weights.safetensors, or a .safetensors file), "
        "a store-relative path, s3://… or another fsspec URL, or a hub repo id"
    )
    weight: Finite = Field(1.0, description="w in W' = W + lora_scale · Σ w·(alpha/r)·B·A")
    alpha: Annotated[Finite, between(1e-6, 1e6)] | None = Field(
        None, description="LoRA alpha; default: the file's metadata, a PEFT config beside it, else the rank"
    )
    name: Annotated[Text, Field(max_length=256)] | None = Field(None, description="a label, not part of the key")
    # Filled in by the producer; another client may send them (checked against the file when read).
    url: str | None = Field(None, description="resolved: the file's URL (set by the producer)")
    sha256: str | None = Field(None, description="resolved: the file's content hash (set by the producer)")


AdapterItem = Annotated[AdapterSpec, BeforeValidator(_uri_or_adapter, json_schema_input_type=str | AdapterSpec)]


class ImageSpec(BaseModel):
    """A job's input image, for image-to-video models."""

    model_config = ConfigDict(extra="forbid", strict=True)

    uri: Annotated[Text, Field(min_length=1, max_length=4096), AfterValidator(_not_blank)] = Field(
        description="a local path, a store-relative path, or s3://… and other fsspec URLs (PNG, JPEG or WebP)"
    )
    # Filled in by the producer; another client may send them (checked against the file when read).
    url: str | None = Field(None, description="resolved: the file's URL (set by the producer)")
    sha256: str | None = Field(None, description="resolved: the file's content hash (set by the producer)")


ImageItem = Annotated[ImageSpec, BeforeValidator(_uri_or_adapter, json_schema_input_type=str | ImageSpec)]


class RenderFields(BaseModel):
    """How to render: the fields a sweep's `render:` mapping may set."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_frames: Annotated[int, between(1, MAX_FRAMES)] | None = Field(None, description="default: the model's")
    height: Annotated[int, between(1, MAX_PIXELS_SIDE)] | None = Field(None, description="default: the model's")
    width: Annotated[int, between(1, MAX_PIXELS_SIDE)] | None = Field(None, description="default: the model's")
    steps: Annotated[int, between(1, 1000)] = 50
    guidance_scale: Annotated[Finite, between(0, 100)] = 6.0
    use_dynamic_cfg: bool = False
    fps: Annotated[int, between(1, 120)] = 8
    fuse: bool = Field(True, description="false renders through the unfused adapter path")


class JobSpec(RenderFields):
    """One line of a jobs file, or the argument of a `lorafleet.render` message."""

    prompt: Annotated[Text, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_not_blank)]
    negative_prompt: Annotated[Text, Field(max_length=MAX_PROMPT_CHARS)] = ""
    adapters: Annotated[list[AdapterItem], Field(max_length=MAX_ADAPTERS)] = Field(
        [], description="adapters, or bare URI strings; [] renders the base model"
    )
    image: ImageItem | None = Field(
        None, description="the first frame to animate: required by image-to-video models, refused by the others"
    )
    lora_scale: Annotated[
        list[Finite], BeforeValidator(_one_or_list, json_schema_input_type=float | list[float]), Field(min_length=1)
    ] = Field([1.0], description="a number, or a list of them: one job per value")
    seed: (
        Annotated[
            list[Annotated[int, between(0, MAX_SEED)]],
            BeforeValidator(_one_or_list, json_schema_input_type=int | list[int]),
            Field(min_length=1),
        ]
        | None
    ) = Field(None, description="an integer, or a list of them: one job per value; default: drawn once at submit")
    model: Text | None = Field(None, description="a model alias (LORAFLEET_MODELS); default: the fleet's model")
    priority: Literal["high", "normal", "low"] | None = Field(
        None, description="which jobs a worker takes first; default: submit's --priority (normal), a sweep's low"
    )
    id: Annotated[Text, Field(max_length=256), AfterValidator(_label)] | None = Field(
        None, description="the user's label, kept in the manifest; not part of the key"
    )
    # Filled in by the producer; another client may send them. The worker derives the key itself.
    key: str | None = Field(None, description="the job key (checked: the worker derives it from the content)")
    batch: Annotated[str, AfterValidator(_batch_name)] | None = Field(
        None, description="the batch name (set by the producer)"
    )


FIELDS = [name for name in JobSpec.model_fields if name not in ("key", "batch")]
RENDER_FIELDS = list(RenderFields.model_fields)
SWEPT_FIELDS = [name for name in FIELDS if name not in RENDER_FIELDS]  # what a sweep sets itself
_KNOWN = {
    JobSpec: FIELDS,
    RenderFields: RENDER_FIELDS,
    AdapterSpec: ["uri", "weight", "alpha", "name"],
    ImageSpec: ["uri"],
}
_MESSAGES = {
    "missing": "required",
    "string_type": "must be a string",
    "string_too_short": "must be a non-empty string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "finite_number": "must be a finite number",
    "list_type": "must be a list",
    "too_short": "an empty list renders nothing",
    "model_type": 'must be a URI string or {"uri": ..., "weight": ...}',
}


def unknown_field(field: str, known) -> str:
    """`unknown field "x"`, with the closest known name if one is close."""
    guess = difflib.get_close_matches(field, list(known), n=1)
    return f'unknown field "{field}"' + (f' (did you mean "{guess[0]}"?)' if guess else "")


def describe(exc: ValidationError, given: dict, model=JobSpec) -> list[tuple[str, str]]:
    """(location, message) for each error of a validation, e.g. ("adapters[1].weight", "must be a
    finite number, got nan"); a scalar that stood for a one-item list keeps its own name."""
    found = []
    for error in exc.errors():
        loc, kind, value = list(error["loc"]), error["type"], error.get("input")
        if (
            len(loc) >= 2
            and loc[1] == 0
            and loc[0] in ("lora_scale", "seed")
            and not isinstance(given.get(loc[0]), list)
        ):
            del loc[1]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
        if kind == "extra_forbidden":
            owner = {"adapters": AdapterSpec, "image": ImageSpec}.get(loc[0], model) if len(loc) > 1 else model
            name, where = loc[-1], where.rpartition(".")[0] if len(loc) > 1 else ""
            found.append((where, unknown_field(str(name), _KNOWN.get(owner, FIELDS))))
            continue
        if kind == "missing" and loc == ["prompt"]:
            message = "required, a non-empty string"
        elif kind == "literal_error":
            message = f"must be one of {error['ctx']['expected']}"
        elif kind in ("string_too_long", "too_long"):
            limit = error["ctx"]["max_length"]
            noun = "characters" if isinstance(value, str) else "adapters" if loc == ["adapters"] else "items"
            message = f"{len(value)} {noun}, more than {limit}" + (" in one job" if noun == "adapters" else "")
        else:
            message = _MESSAGES.get(kind, error["msg"])
            if kind == "list_type" and loc == ["adapters"]:
                message = "must be a list of adapters"
            if kind == "model_type" and loc == ["image"]:
                message = 'must be a URI string or {"uri": ...}'
            if kind in ("finite_number", "between") and isinstance(value, float) and not math.isfinite(value):
                message += f", got {value}"
            elif kind not in ("missing", "too_short", "model_type", "surrogate", "label", "blank", "batch_name"):
                message += f", got {quoted(value)}"  # YAML can hold dates
        found.append((where, message))
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
    if size != (spec.num_frames, spec.height, spec.width):  # a copy a job only where the model fills one in
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
