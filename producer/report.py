"""A sweep's report: for each adapter set, a grid of prompt × seed rows and lora_scale columns.

Each cell links the poster to the MP4 and gives numbers computed from the videos alone (no extra
model weights): mean SSIM and PSNR against the same prompt and seed at lora_scale 0 (how far the
adapter moves the output), temporal consistency (mean SSIM of consecutive frames), render time.
Written to batches/<batch>/report.html (images are the store's posters, linked relative to it),
report.json (every number) and plots/set<N>.png (each number against lora_scale).
"""

import html
import io
import json
import math
import tempfile

import numpy as np

from common.job import adapter_combination
from common.manifest import Batch
from common.store import Store, video_path

SSIM_WINDOW = 7
MOVED = {"ssim_vs_base": 0.02, "psnr_vs_base": 1.0, "temporal_ssim": 0.02}  # default --compare thresholds


def decode(store: Store, key: str) -> np.ndarray:
    """A stored video's frames as (frames, height, width, 3) uint8."""
    import imageio.v3 as iio

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(store.read_bytes(video_path(key, "mp4")))
        f.flush()
        return np.stack(list(iio.imiter(f.name, plugin="FFMPEG")))


def _box(image: np.ndarray, size: int) -> np.ndarray:
    """Mean over every size×size window ("valid" positions only), through summed-area tables."""
    table = np.pad(image.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]) / size**2


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two RGB frames (on luma, 7×7 windows, the usual constants)."""
    weights = np.array([0.299, 0.587, 0.114])
    x, y = (frame.astype(np.float64) @ weights for frame in (a, b))
    size = min(SSIM_WINDOW, *x.shape)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _box(x, size), _box(y, size)
    vx, vy, cxy = _box(x * x, size) - mx**2, _box(y * y, size) - my**2, _box(x * y, size) - mx * my
    return float(np.mean(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical videos)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def video_numbers(video: np.ndarray, base: np.ndarray) -> dict:
    """SSIM and PSNR against the base video, and temporal consistency."""
    return {
        "ssim_vs_base": float(np.mean([ssim(f, g) for f, g in zip(video, base, strict=True)])),
        "psnr_vs_base": psnr(video, base),
        "temporal_ssim": float(np.mean([ssim(f, g) for f, g in zip(video[:-1], video[1:], strict=True)]))
        if len(video) > 1
        else 1.0,
    }


def build_report(
    batch: Batch, store: Store, jobs: list[dict], cells: list[dict], prompts: list[str], compare: dict | None = None
) -> dict:
    """Compute every cell's numbers and write report.json, report.html and the plots; returns the report."""
    entries = {entry["key"]: entry for entry in batch.entries}
    metadata = {job["key"]: json.loads(store.read_bytes(video_path(job["key"], "json"))) for job in jobs}
    bases: dict[tuple, np.ndarray] = {}
    for job, cell in zip(jobs, cells, strict=True):
        if cell["lora_scale"] == 0:
            bases[(cell["prompt"], cell["seed"])] = decode(store, job["key"])
    report_cells = []
    for job, cell in zip(jobs, cells, strict=True):
        video = bases[(cell["prompt"], cell["seed"])] if cell["lora_scale"] == 0 else decode(store, job["key"])
        numbers = video_numbers(video, bases[(cell["prompt"], cell["seed"])])
        meta = metadata[job["key"]]
        numbers["render_s"] = meta["timings_s"]["total"]
        if math.isinf(numbers["psnr_vs_base"]):
            numbers["psnr_vs_base"] = None  # identical to the base; JSON has no infinity
        report_cells.append(
            {
                **cell,
                "key": job["key"],
                "adapters": [
                    {"sha256": a["sha256"], "weight": a["weight"], "alpha": a["alpha"], "uri": a["uri"]}
                    for a in job["adapters"]
                ],
                "prompt_text": prompts[cell["prompt"]],
                "status": entries[job["key"]]["status"],
                "worker": meta["worker"],
                "numbers": numbers,
                "moved": [],
            }
        )
    if compare:
        _mark_moved(report_cells, compare)
    report = {
        "batch": batch.name,
        "cells": report_cells,
        "switches": _switches(metadata),
        "compared_with": (compare or {}).get("batch"),
    }
    base_dir = f"batches/{batch.name}"
    store.write_bytes(f"{base_dir}/report.json", json.dumps(report, indent=1).encode())
    sets = sorted({c["set"] for c in report_cells})
    for s in sets:
        store.write_bytes(f"{base_dir}/plots/set{s}.png", _plot([c for c in report_cells if c["set"] == s], s))
    store.write_bytes(f"{base_dir}/report.html", _html(report, sets).encode())
    return report


def _identity(cell: dict) -> tuple:
    """What makes two nights' cells the same cell: the adapters' content, prompt, seed and scale."""
    return adapter_combination(cell), cell["prompt_text"], cell["seed"], cell["lora_scale"]


def _mark_moved(cells: list[dict], previous: dict) -> None:
    before = {_identity(c): c["numbers"] for c in previous["cells"]}
    for cell in cells:
        old = before.get(_identity(cell))
        if old is None:
            continue
        for name, threshold in MOVED.items():
            a, b = cell["numbers"][name], old[name]
            a, b = (100.0 if v is None else v for v in (a, b))  # None: identical to the base
            if abs(a - b) > threshold:
                cell["moved"].append(name)


def _switches(metadata: dict) -> dict[str, int]:
    """Variant switches each worker made for this batch."""
    counts: dict[str, int] = {}
    for meta in metadata.values():
        counts[meta["worker"]] = counts.get(meta["worker"], 0) + int(bool(meta.get("variant_switched")))
    return counts


def _plot(cells: list[dict], set_index: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("ssim_vs_base", "psnr_vs_base", "temporal_ssim", "render_s")
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), constrained_layout=True)
    rows = sorted({(c["prompt"], c["seed"]) for c in cells})
    for axis, name in zip(axes, names, strict=True):
        for row in rows:
            points = sorted((c["lora_scale"], c["numbers"][name]) for c in cells if (c["prompt"], c["seed"]) == row)
            points = [(x, y) for x, y in points if y is not None]
            axis.plot(
                [x for x, _ in points], [y for _, y in points], marker="o", label=f"prompt {row[0]}, seed {row[1]}"
            )
        axis.set_xlabel("lora_scale")
        axis.set_title(name)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"adapter set {set_index}")
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=80)
    plt.close(figure)
    return out.getvalue()


def _fmt(value, digits=3) -> str:
    return "∞" if value is None else f"{value:.{digits}f}"


def _html(report: dict, sets: list[int]) -> str:
    up = "../../"  # from batches/<batch>/ to the store's root
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>lorafleet sweep {html.escape(report['batch'])}</title>",
        "<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:6px;text-align:center;vertical-align:top}img.poster{width:160px;image-rendering:pixelated}img.plot{max-width:100%}"
        "td.moved{background:#fff3cd}.n{font:12px monospace;text-align:left}</style>",
        f"<h1>Sweep {html.escape(report['batch'])}</h1>",
        f"<p>{len(report['cells'])} cells. Variant switches per worker: "
        + ", ".join(f"{html.escape(w)}: {n}" for w, n in sorted(report["switches"].items()))
        + (
            f". Cells marked yellow moved since batch {html.escape(report['compared_with'])}."
            if report["compared_with"]
            else "."
        )
        + "</p>",
    ]
    for s in sets:
        cells = [c for c in report["cells"] if c["set"] == s]
        scales = sorted({c["lora_scale"] for c in cells})
        rows = sorted({(c["prompt"], c["seed"]) for c in cells})
        adapters = ", ".join(f"{html.escape(a['uri'])} ×{a['weight']}" for a in cells[0]["adapters"])
        parts.append(
            f"<h2>Adapter set {s}: {adapters}</h2><img src='plots/set{s}.png' class='plot' alt='numbers against lora_scale'>"
        )
        parts.append(
            "<table><tr><th>prompt, seed</th>" + "".join(f"<th>lora_scale {x:g}</th>" for x in scales) + "</tr>"
        )
        for prompt, seed in rows:
            text = next(c["prompt_text"] for c in cells if c["prompt"] == prompt)
            parts.append(f"<tr><th>{html.escape(text)}<br>seed {seed}</th>")
            for scale in scales:
                cell = next(c for c in cells if (c["prompt"], c["seed"], c["lora_scale"]) == (prompt, seed, scale))
                n = cell["numbers"]
                parts.append(
                    f"<td class='cell{' moved' if cell['moved'] else ''}' data-key='{cell['key']}'>"
                    f"<a href='{up}videos/{cell['key']}.mp4'><img class='poster' src='{up}videos/{cell['key']}.png' alt='poster'></a>"
                    f"<div class='n'>SSIM {_fmt(n['ssim_vs_base'])}<br>PSNR {_fmt(n['psnr_vs_base'], 1)} dB<br>"
                    f"temporal {_fmt(n['temporal_ssim'])}<br>{_fmt(n['render_s'], 2)} s"
                    + (f"<br>moved: {', '.join(cell['moved'])}" if cell["moved"] else "")
                    + "</div></td>"
                )
            parts.append("</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def load_report(store: Store, batch: str) -> dict:
    """A previous batch's report.json, for --compare."""
    return json.loads(store.read_bytes(f"batches/{batch}/report.json"))
