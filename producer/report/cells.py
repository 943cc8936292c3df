"""A report's cell: a sweep cell with what its job was and what its video measured, as report.json
holds it; what a later night reads of a report (Baseline); and what a report reads of a video's
metadata (VideoMetadata). Cells are made by `measured_cells` and written by `write_report`; what is
read back from the store (a baseline night's report, a video's metadata) is read through these
models alone."""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from common.sweep_grid import Cell


class ReportCell(Cell):
    """A sweep cell, its job's key, adapters (sha256, weight, alpha, uri, name), prompt and input
    image, its status and worker, whether it was evaluated, its numbers (by METRICS' names, plus
    render_s; None: scale 0's infinite PSNR) and the numbers that moved since a baseline night."""

    key: str
    adapters: list[dict[str, Any]]
    prompt_text: str
    image: dict[str, Any] | None = None  # image-to-video: the input, shown beside its rows
    status: str
    worker: str
    evaluated: bool
    numbers: dict[str, float | None]
    moved: list[str] = []


def written(cells: list[ReportCell]) -> list[dict]:
    """Cells as report.json holds them."""
    return [cell.model_dump() for cell in cells]


class SectionSeen(BaseModel):
    """What a later night reads of a report's section: its adapter set's identity across nights
    (`combination`, at scale 1), its axes and its suggestion."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    combination: list[list[Any]]
    axes: dict[str, Any] | None = None
    suggested: float | None


class Baseline(BaseModel):
    """A baseline night's report.json as --compare reads it (pydantic.ValidationError where it is
    not one lorafleet wrote)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    batch: str
    cells: list[ReportCell]
    sets: list[SectionSeen] = []


class Timings(BaseModel):
    """A render's seconds, by step; `total` is what the report shows."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    total: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class VideoMetadata(BaseModel):
    """What a report reads of a video's metadata (videos/<key>.json, written by the worker that
    rendered it: workers/renderer.py's render_frames)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key: str
    worker: str
    model: str
    scheduler: str | None = None
    dtype: str | None = None
    device: str = "?"
    versions: dict[str, Any] = {}
    timings_s: Timings
    rendered_at: str
    variant_switched: bool = False
