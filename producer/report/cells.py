"""A report's cell: a sweep cell with what its job was and what its video measured, as report.json
holds it; and what a later night reads of a report (Baseline). Written by `measured_cells` and read
back (a baseline night's report, a saved report's page) through these models alone."""

from typing import Any

from pydantic import BaseModel, ConfigDict

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


def read_cells(written: list) -> list[ReportCell]:
    """A report.json's cells (pydantic.ValidationError where one is not a cell lorafleet wrote)."""
    return [ReportCell.model_validate(cell) for cell in written]


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
