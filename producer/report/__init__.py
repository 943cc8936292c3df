"""A sweep's report, written for the person who picks the lora_scale to ship for an adapter set.

batches/<batch>/report.html (with report.json holding every number, and plots/set<N>.png):
what each number measures and which way is better; the sweep's settings and provenance; per
adapter set a suggested scale by the rule the page states, with notices where it sits at an edge of
the swept range or cannot be told from the scale the rule turned down (PAIRED_RULE), the mean and
standard deviation of each number across prompts × seeds at each scale, plots, and the grid of
videos (rows prompt × seed, columns lora_scale), each cell a muted looping video; with `axes:`, the
further axes against lora_scale first and a section per combination; a draft night's exact
confirmation beside its draft cells; the adapter sets side by side at each scale; render
time per worker. The per-key numbers come from the workers' evaluations (eval.json,
common/evaluation.py); the ones between a cell and its scale-0 cell are computed here.

In three parts: the numbers and rules (rules.py: no HTML, table-tested), the plots (plots.py) and
the page (page.py and its Jinja2 template, page.html, autoescaped); here, what reads the store and
writes the report.
"""

import functools
import io
import json
import time
from collections.abc import Callable

import numpy as np

from common.errors import StoreError
from common.evaluation import Evaluation, read_video, vs_base
from common.images import read_image_url
from common.job import Job
from common.manifest import Batch
from common.reading import ReadPolicy
from common.store import Store, video_path
from common.sweep_grid import Cell
from common.sweep_spec import MOVED, SUGGEST
from producer.report.cells import Baseline, ReportCell, VideoMetadata, written
from producer.report.page import render_page
from producer.report.plots import plot
from producer.report.rules import (
    CLIP_METRICS,
    METRICS,
    MIN_PAIRS,
    PAIRED_RULE,
    axes_id,
    confirm_scales,
    distinguishable,
    groups,
    mark_moved,
    provenance,
    refine_scale,
    refinement,
    render_times,
    rule_text,
    section,
    section_of,
    summarise,
    switches,
)

__all__ = [
    "CLIP_METRICS", "METRICS", "MIN_PAIRS", "PAIRED_RULE", "ReportCell", "build_report", "confirm_scales",
    "distinguishable", "load_report", "mark_moved", "read_metadata", "refine_scale", "summarise",
]  # fmt: skip


def build_report(
    batch: Batch,
    store: Store,
    jobs: list[Job],
    cells: list[Cell],
    evaluations: dict[str, Evaluation],
    options: dict | None = None,
    compare: Baseline | None = None,
    *,
    max_video_pixels: int,
    policy: ReadPolicy,
) -> dict:
    """Compute every cell's numbers and write report.json, report.html and the plots; returns the
    report (its cells as ReportCells). Videos are read up to `max_video_pixels`, input images under `policy` (the settings')."""
    options = options or {"suggest": SUGGEST, "moved": MOVED}
    metadata = {job.key: read_metadata(store, job.key) for job in jobs}
    statuses = {entry.key: entry.status for entry in batch.entries}
    video = functools.cache(lambda key: read_video(store, key, max_video_pixels))
    report_cells = measured_cells(list(zip(jobs, cells, strict=True)), evaluations, metadata, statuses, video)
    if compare:
        report_cells = mark_moved(report_cells, compare.cells, options["moved"])
    clip = any(name in c.numbers for c in report_cells for name in CLIP_METRICS)
    swept = [c for c in report_cells if c.tier is None]  # a draft sweep's confirmation aside
    sets = [section(group, swept, options["suggest"], clip) for group in groups(swept)]
    if options.get("refine"):
        for s in sets:
            s["refinement"] = refinement(s, [c for c in swept if c.section == section_of(s)], options["refine"])
    exact = [c for c in report_cells if c.tier == "exact"]
    # named as the swept sections, and at an edge only where the draft's sweep is: the top confirmed
    # scale is not the largest swept
    top = {section_of(s): max(s["scales"]) for s in sets}
    confirmed = [section(group, exact, options["suggest"], clip, top.get(group)) for group in groups(exact)]
    if compare:
        before = {json.dumps([s.combination, s.axes]): s.suggested for s in compare.sets}
        for s in sets:  # the baseline night's suggestion, where it swept the same adapter set (and axes)
            if (same := json.dumps([s["combination"], s.get("axes")])) in before:
                s["baseline_suggested"] = before[same]
    report = {
        "batch": batch.name,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "provenance": provenance(jobs, metadata, evaluations),
        "clip": clip,
        "rule": rule_text(options["suggest"], clip),
        "options": options,
        "sets": sets,
        # a draft sweep's suggestion and neighbours rendered exactly, per section: the night's decision
        "confirmed": confirmed,
        "confirm_model": (options.get("confirm") or {}).get("model"),
        "cells": report_cells,  # ReportCells: written as report.json holds them by write_report
        "render_time_per_worker": render_times(metadata),
        "switches": switches(metadata),
        "compared_with": compare and compare.batch,
    }
    write_report(store, report, report_cells, policy)
    return report


def measured_cells(
    placed: list[tuple[Job, Cell]],
    evaluations: dict[str, Evaluation],
    metadata: dict[str, VideoMetadata],
    statuses: dict[str, str],
    video: Callable[[str], np.ndarray],
) -> list[ReportCell]:
    """Each sweep cell with its job's adapters, prompt, status and worker, and its numbers: those
    between its video and its scale-0 cell's, its evaluation's, and its render time."""
    # each tier against its own scale 0: a draft's cells against the draft base, exact ones the exact base
    base_of = lambda c: (c.tier, axes_id(c.axes), c.prompt, c.seed)  # noqa: E731
    base_keys = {base_of(c): j.key for j, c in placed if c.lora_scale == 0}
    measured = []
    for job, cell in placed:
        key = job.key
        evaluation = evaluations.get(key)
        numbers = {
            **vs_base(video(key), video(base_keys[base_of(cell)])),
            **(evaluation.numbers if evaluation else {}),
            "render_s": metadata[key].timings_s.total,
        }
        measured.append(
            ReportCell(
                **dict(cell),
                key=key,
                adapters=[
                    a.model_dump(include={"sha256", "weight", "alpha", "uri"} | ({"name"} if a.name else set()))
                    for a in job.adapters
                ],
                prompt_text=job.prompt,
                image=job.image and job.image.model_dump(),
                status=statuses[key],
                worker=metadata[key].worker,
                evaluated=evaluation is not None,
                numbers=numbers,
            )
        )
    return measured


def write_report(store: Store, report: dict, cells: list[ReportCell], policy: ReadPolicy) -> None:
    """report.json, a plot per section of the swept cells, the input images' thumbnails, report.html."""
    base_dir = f"batches/{report['batch']}"
    store.write_bytes(f"{base_dir}/report.json", json.dumps({**report, "cells": written(cells)}, indent=1).encode())
    swept = [c for c in cells if c.tier is None]
    for s in report["sets"]:
        cells_of_section = [c for c in swept if c.section == section_of(s)]
        store.write_bytes(f"{base_dir}/plots/{s['section']}.png", plot(cells_of_section, s["set"]))
    images = {c.image["sha256"]: c.image for c in cells if c.image}
    for sha256, image in images.items():
        store.write_bytes(f"{base_dir}/images/{sha256}.png", thumbnail(image, policy))
    store.write_bytes(f"{base_dir}/report.html", render_page(report).encode())


def thumbnail(image: dict, policy: ReadPolicy) -> bytes:
    """An input image at most 160 pixels wide, as PNG, checked against the hash its jobs were keyed by."""
    picture = read_image_url(image["url"], image["sha256"], policy)
    picture.thumbnail((160, 160))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def read_metadata(store: Store, key: str) -> VideoMetadata:
    """A video's metadata as the report reads it; StoreError, naming the file, where it is not
    what a worker writes for that key (anyone who can write the store can write it)."""
    path = video_path(key, "json")
    try:
        metadata = VideoMetadata.model_validate_json(store.read_bytes(path))
    except ValueError as exc:
        raise StoreError(f"{store.uri(path)} is not a video's metadata as a worker writes it: {exc}") from None
    if metadata.key != key:
        raise StoreError(f"{store.uri(path)} holds the metadata of another video ({metadata.key[:12]})")
    return metadata


def load_report(store: Store, batch: str) -> Baseline:
    """A previous batch's report, for --compare; ValueError (pydantic's ValidationError is one) where
    it is not JSON or not a report lorafleet wrote."""
    return Baseline.model_validate_json(store.read_bytes(f"batches/{batch}/report.json"))
