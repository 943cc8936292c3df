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
"""

import html
import io
import json
import statistics
import time

import numpy as np

import common
from common.evaluation import read_video, vs_base
from common.images import read_image_url
from common.job import Job, adapter_combination
from common.manifest import Batch
from common.reading import ReadPolicy
from common.store import Store, video_path
from common.sweep_spec import MOVED, SUGGEST

# name: (label, what it measures, which way is better)
METRICS = {
    "clip_score": (
        "CLIPScore",
        "how well the frames match the prompt: 100 × the cosine of CLIP's prompt and frame embeddings, "
        "floored at 0, mean over 8 frames spread over the video",
        "higher is better",
    ),
    "clip_consistency": (
        "CLIP consistency",
        "how alike consecutive sampled frames look to CLIP: mean cosine of their image embeddings",
        "higher is steadier; a drop means flicker or jumps in content",
    ),
    "temporal_ssim": (
        "temporal SSIM",
        "pixel-level smoothness: mean SSIM of consecutive frames",
        "higher is steadier",
    ),
    "ssim_vs_base": (
        "SSIM vs scale 0",
        "how much of the base video's structure is kept: mean SSIM against the same prompt and seed at lora_scale 0",
        "1 at scale 0; lower means the adapter changes the video more (its strength, not its quality)",
    ),
    "psnr_vs_base": (
        "PSNR vs scale 0",
        "pixel difference from the same prompt and seed at lora_scale 0, in dB",
        "∞ at scale 0 (identical); lower means the adapter changes the video more",
    ),
}
CLIP_METRICS = ("clip_score", "clip_consistency")
# Two scales are told apart only by a paired comparison over the same prompts and seeds: for some
# number the rule reads, the mean of the per-pair differences lies beyond twice its standard error
# (about a 95% paired t-test once there are ten pairs or more), and there are at least MIN_PAIRS pairs.
MIN_PAIRS = 3
PAIRED_RULE = (
    f"a paired comparison over the same prompts and seeds: the mean difference beyond two standard errors, "
    f"with at least {MIN_PAIRS} prompt × seed pairs"
)
PSNR_CEILING = 60.0  # where the plots draw scale 0's infinite PSNR


def build_report(
    batch: Batch,
    store: Store,
    jobs: list[Job],
    cells: list[dict],
    prompts: list[str],
    evaluations: dict[str, dict],
    options: dict | None = None,
    compare: dict | None = None,
    *,
    max_video_pixels: int,
    policy: ReadPolicy,
) -> dict:
    """Compute every cell's numbers and write report.json, report.html and the plots; returns the
    report. Videos are read up to `max_video_pixels`, input images under `policy` (the settings')."""
    options = options or {"suggest": SUGGEST, "moved": MOVED}
    entries = {entry.key: entry for entry in batch.entries}
    metadata = {job.key: json.loads(store.read_bytes(video_path(job.key, "json"))) for job in jobs}
    videos: dict[str, np.ndarray] = {}

    def video(key: str) -> np.ndarray:
        if key not in videos:
            videos[key] = read_video(store, key, max_video_pixels)
        return videos[key]

    # each tier against its own scale 0: a draft's cells against the draft base, exact ones the exact base
    base_keys = {
        (c.get("tier"), _axes_id(c), c["prompt"], c["seed"]): j.key
        for j, c in zip(jobs, cells, strict=True)
        if c["lora_scale"] == 0
    }
    report_cells = []
    for job, cell in zip(jobs, cells, strict=True):
        key = job.key
        evaluation = evaluations.get(key)
        numbers = {
            **vs_base(video(key), video(base_keys[(cell.get("tier"), _axes_id(cell), cell["prompt"], cell["seed"])])),
            **(evaluation["numbers"] if evaluation else {}),
            "render_s": metadata[key]["timings_s"]["total"],
        }
        report_cells.append(
            {
                **cell,
                "key": key,
                "adapters": [
                    a.model_dump(include={"sha256", "weight", "alpha", "uri"} | ({"name"} if a.name else set()))
                    for a in job.adapters
                ],
                "prompt_text": prompts[cell["prompt"]],
                "image": job.image and job.image.model_dump(),  # image-to-video: the input, shown beside its rows
                "status": entries[key].status,
                "worker": metadata[key]["worker"],
                "evaluated": evaluation is not None,
                "numbers": numbers,
                "moved": [],
            }
        )
    if compare:
        _mark_moved(report_cells, compare, options["moved"])
    clip = any(name in c["numbers"] for c in report_cells for name in CLIP_METRICS)
    swept = [c for c in report_cells if c.get("tier") is None]  # a draft sweep's confirmation aside
    sets = [_section(group, swept, options["suggest"], clip) for group in _groups(swept)]
    exact = [c for c in report_cells if c.get("tier") == "exact"]
    confirmed = [_summarise(s, [c for c in exact if c["set"] == s], options["suggest"], clip) for s in _sets(exact)]
    if compare:
        same = lambda s: json.dumps([s["combination"], s.get("axes")])  # noqa: E731
        before = {same(s): s["suggested"] for s in compare.get("sets", [])}
        for s in sets:  # the baseline night's suggestion, where it swept the same adapter set (and axes)
            if same(s) in before:
                s["baseline_suggested"] = before[same(s)]
    report = {
        "batch": batch.name,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "provenance": _provenance(jobs, metadata, evaluations),
        "clip": clip,
        "rule": _rule(options["suggest"], clip),
        "options": options,
        "sets": sets,
        # a draft sweep's suggestion and neighbours rendered exactly, per set: the night's decision
        "confirmed": confirmed,
        "confirm_model": (options.get("confirm") or {}).get("model"),
        "cells": report_cells,
        "render_time_per_worker": _render_times(metadata),
        "switches": _switches(metadata),
        "compared_with": (compare or {}).get("batch"),
    }
    base_dir = f"batches/{batch.name}"
    store.write_bytes(f"{base_dir}/report.json", json.dumps(report, indent=1).encode())
    for s in sets:
        cells_of_section = [c for c in swept if _group_of(c) == (s["set"], _axes_id(s))]
        store.write_bytes(f"{base_dir}/plots/{s['section']}.png", _plot(cells_of_section, s["set"]))
    images = {c["image"]["sha256"]: c["image"] for c in report_cells if c.get("image")}
    for sha256, image in images.items():
        store.write_bytes(f"{base_dir}/images/{sha256}.png", _thumbnail(image, policy))
    store.write_bytes(f"{base_dir}/report.html", _html(report).encode())
    return report


def _thumbnail(image: dict, policy: ReadPolicy) -> bytes:
    """An input image at most 160 pixels wide, as PNG, checked against the hash its jobs were keyed by."""
    picture = read_image_url(image["url"], image["sha256"], policy)
    picture.thumbnail((160, 160))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _sets(cells: list[dict]) -> list[int]:
    return sorted({c["set"] for c in cells})


def _axes_id(cell: dict) -> str:
    """A cell's values on a spec's further axes (`axes:`), as one comparable string ("" for none)."""
    return json.dumps(cell["axes"], sort_keys=True) if cell.get("axes") else ""


def _group_of(cell: dict) -> tuple[int, str]:
    return cell["set"], _axes_id(cell)


def _groups(cells: list[dict]) -> list[tuple[int, str]]:
    """The report's sections: one per adapter set and combination of the further axes, in sweep order."""
    return list(dict.fromkeys(sorted(map(_group_of, cells), key=lambda g: g[0])))


def _section(group: tuple[int, str], cells: list[dict], suggest: dict, clip: bool) -> dict:
    """One section's summary: an adapter set's, or with further axes, the set's at one combination of
    them ({"axes": {...}}); `section` names its plot and its place in the page."""
    index, axes = group
    ordinal = [g for g in _groups(cells) if g[0] == index].index(group)
    summary = _summarise(index, [c for c in cells if _group_of(c) == group], suggest, clip)
    if not axes:
        return {**summary, "section": f"set{index}"}
    return {**summary, "axes": json.loads(axes), "section": f"set{index}-a{ordinal}"}


def _axes_text(axes: dict | None) -> str:
    return ", ".join(f"{name} {value if isinstance(value, str) else f'{value:g}'}" for name, value in (axes or {}).items())


def distinguishable(a: list[float], b: list[float]) -> bool:
    """Whether two scales' values of one number, paired by prompt and seed, differ by PAIRED_RULE."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    if len(differences) < MIN_PAIRS:
        return False
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    return abs(mean) > 2 * sd / len(differences) ** 0.5


def _summarise(index: int, cells: list[dict], suggest: dict, clip: bool) -> dict:
    """Mean and standard deviation of each number at each scale across prompts × seeds, the
    suggested scale, and what the page should say about it (`_notices`)."""
    scales = sorted({c["lora_scale"] for c in cells})
    summary = {}
    for scale in scales:
        at = [c["numbers"] for c in cells if c["lora_scale"] == scale]
        summary[str(scale)] = {}
        for name in METRICS:
            values = [n[name] for n in at if n.get(name) is not None]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[str(scale)][name] = {"mean": statistics.fmean(values), "sd": spread, "n": len(values)}
    consistency = "clip_consistency" if clip else "temporal_ssim"
    suggested = None
    base = summary.get("0.0", {})
    for scale in scales:
        now = summary[str(scale)]
        if scale == 0 or consistency not in now or consistency not in base:
            continue
        adherent = not clip or now["clip_score"]["mean"] >= base["clip_score"]["mean"] - suggest["clip_score_drop"]
        steady = now[consistency]["mean"] >= base[consistency]["mean"] - suggest["consistency_drop"]
        if adherent and steady:
            suggested = scale
    rule_numbers = ["clip_score", consistency] if clip else [consistency]
    return {
        "notices": _notices(cells, scales, suggested, rule_numbers),
        "set": index,
        "adapters": cells[0]["adapters"],
        # the set's identity across nights (at scale 0 every combination is empty: ask at scale 1)
        "combination": [list(term) for term in adapter_combination(cells[0]["adapters"], 1.0)],
        "scales": scales,
        "summary": summary,
        "suggested": suggested,
    }


def _notices(cells: list[dict], scales: list[float], suggested: float | None, numbers: list[str]) -> list[dict]:
    """What to know before trusting a suggestion, each {"kind", "text"}: it sits at an edge of the
    swept range (extend the range that way), or the scale it passed and the next one up, which the
    rule turned down, cannot be told apart at this sample size (PAIRED_RULE on the rule's numbers)."""
    notices = []
    positive = [x for x in scales if x > 0]
    if suggested is not None and suggested == max(scales):
        notices.append({
            "kind": "edge-high",
            "text": f"{suggested:g} is the largest lora_scale swept: a larger one may pass the rule too; "
            f"extend lora_scales above {suggested:g}",
        })  # fmt: skip
    elif suggested is None and positive:
        notices.append({
            "kind": "edge-low",
            "text": f"no lora_scale above 0 passes the rule: the line lies between 0 and {positive[0]:g}; "
            f"sweep smaller scales there",
        })  # fmt: skip
    passed = 0.0 if suggested is None else suggested
    turned_down = next((x for x in scales if x > passed), None)
    if turned_down is not None and passed in scales:

        def paired(scale: float, name: str) -> dict:
            return {(c["prompt"], c["seed"]): c["numbers"].get(name) for c in cells if c["lora_scale"] == scale}

        told_apart, pairs = False, 0
        for name in numbers:
            a, b = paired(passed, name), paired(turned_down, name)
            both = [place for place in a if place in b and a[place] is not None and b[place] is not None]
            pairs = max(pairs, len(both))
            told_apart |= distinguishable([a[p] for p in both], [b[p] for p in both])
        if not told_apart:
            notices.append({
                "kind": "indistinguishable",
                "text": f"lora_scale {passed:g} (passed) and {turned_down:g} (turned down) are not distinguishable at "
                f"this sample size (n = {pairs} prompt × seed pairs; rule: {PAIRED_RULE}): add prompts or seeds "
                "before trusting the suggestion",
            })  # fmt: skip
    return notices


def _rule(suggest: dict, clip: bool) -> str:
    if clip:
        return (
            f"the largest lora_scale above 0 whose mean CLIPScore is at most {suggest['clip_score_drop']:g} below "
            f"scale 0's and whose mean CLIP consistency is at most {suggest['consistency_drop']:g} below scale 0's"
        )
    return (
        f"no CLIP model is configured (LORAFLEET_EVAL_CLIP), so prompt adherence is not measured: the largest "
        f"lora_scale above 0 whose mean temporal SSIM is at most {suggest['consistency_drop']:g} below scale 0's"
    )


def _provenance(jobs: list[Job], metadata: dict, evaluations: dict) -> dict:
    job, meta = jobs[0], metadata[jobs[0].key]
    evaluator = next(iter(evaluations.values()), {}).get("evaluator")
    return {
        "model": meta["model"],
        "scheduler": meta.get("scheduler"),
        "steps": job.steps,
        "size": f"{job.num_frames} frames × {job.height} × {job.width}",
        "guidance_scale": job.guidance_scale,
        "fps": job.fps,
        "dtype": meta.get("dtype"),
        "lorafleet": common.__version__,
        "versions": meta.get("versions", {}),
        "workers": sorted({m["worker"] for m in metadata.values()}),
        "devices": sorted({m.get("device", "?") for m in metadata.values()}),
        "rendered": f"{min(m['rendered_at'] for m in metadata.values())} to {max(m['rendered_at'] for m in metadata.values())}",
        "evaluator": evaluator,
    }


def _render_times(metadata: dict) -> dict[str, dict]:
    """Render seconds per worker: jobs, mean, min, max (a number per worker, not a plot of noise)."""
    times: dict[str, list[float]] = {}
    for meta in metadata.values():
        times.setdefault(meta["worker"], []).append(meta["timings_s"]["total"])
    return {
        worker: {"jobs": len(t), "mean": statistics.fmean(t), "min": min(t), "max": max(t)}
        for worker, t in sorted(times.items())
    }


def _identity(cell: dict) -> tuple:
    """What makes two nights' cells the same cell: the adapters' content, prompt, seed, scale, tier and axes."""
    combination = adapter_combination(cell["adapters"], cell["lora_scale"])
    return combination, cell["prompt_text"], cell["seed"], cell["lora_scale"], cell.get("tier"), _axes_id(cell)


def refine_scale(summary: dict, resolution: float) -> float | None:
    """The next scale a refining sweep adds to a set, or None when it is done: halfway between the
    suggestion (0 when none) and the next scale up, which the rule turned down, while that gap is
    wider than `resolution` and the two can be told apart (PAIRED_RULE); never past the range swept."""
    scales, suggested = summary["scales"], summary["suggested"]
    passed = 0.0 if suggested is None else suggested
    above = [x for x in scales if x > passed]
    if not above or above[0] - passed <= resolution + 1e-9:
        return None
    if any(n["kind"] == "indistinguishable" for n in summary["notices"]):
        return None
    return round((passed + above[0]) / 2, 6)


def confirm_scales(summary: dict) -> list[float]:
    """The scales a draft sweep's set is rendered at again, exactly: scale 0 (the rule's reference),
    the suggested scale and its neighbours in the sweep (none suggested: the smallest above 0)."""
    scales, suggested = summary["scales"], summary["suggested"]
    if suggested is None:
        return sorted({0.0, *[x for x in scales if x > 0][:1]})
    at = scales.index(suggested)
    return sorted({0.0, *scales[max(at - 1, 0) : at + 2]})


def _mark_moved(cells: list[dict], previous: dict, thresholds: dict) -> None:
    before = {_identity(c): c["numbers"] for c in previous["cells"]}
    for cell in cells:
        old = before.get(_identity(cell))
        if old is None:
            continue
        for name, threshold in thresholds.items():
            if name not in cell["numbers"] or name not in old:
                continue  # not measured on one of the nights (no CLIP then)
            a, b = (100.0 if v is None else v for v in (cell["numbers"][name], old[name]))  # None: identical
            if abs(a - b) > threshold:
                cell["moved"].append(name)


def _switches(metadata: dict) -> dict[str, int]:
    """Variant switches each worker made for this batch."""
    counts: dict[str, int] = {}
    for meta in metadata.values():
        counts[meta["worker"]] = counts.get(meta["worker"], 0) + int(bool(meta.get("variant_switched")))
    return counts


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _plot(cells: list[dict], set_index: int) -> bytes:
    """Each number against lora_scale: a line per prompt × seed (the prompt in the legend), the mean
    in black; scale 0's infinite PSNR drawn at the ceiling and said so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in METRICS if any(name in c["numbers"] for c in cells)]
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), constrained_layout=True)
    rows = sorted({(c["prompt"], c["seed"]) for c in cells})
    scales = sorted({c["lora_scale"] for c in cells})
    for axis, name in zip(np.atleast_1d(axes), names, strict=True):

        def value(cell, name=name):
            number = cell["numbers"].get(name)
            return PSNR_CEILING if name == "psnr_vs_base" and number is None else number

        for prompt, seed in rows:
            row = sorted(
                (c for c in cells if (c["prompt"], c["seed"]) == (prompt, seed)), key=lambda c: c["lora_scale"]
            )
            points = [(c["lora_scale"], value(c)) for c in row if value(c) is not None]
            text = _short(row[0]["prompt_text"], 32)
            axis.plot(*zip(*points, strict=True), marker="o", alpha=0.6, label=f"{text} (seed {seed})")
        means = [
            (s, statistics.fmean(v))
            for s in scales
            if (v := [value(c) for c in cells if c["lora_scale"] == s and value(c) is not None])
        ]
        axis.plot(*zip(*means, strict=True), color="black", linewidth=2.5, label="mean")
        axis.set_xlabel("lora_scale")
        axis.set_title(METRICS[name][0], fontsize=10)
        if name == "psnr_vs_base":
            axis.annotate(f"scale 0: ∞ (identical),\ndrawn at {PSNR_CEILING:g} dB", (0, PSNR_CEILING), fontsize=7,
                          xytext=(6, -22), textcoords="offset points")  # fmt: skip
    np.atleast_1d(axes)[0].legend(fontsize=6)
    figure.suptitle(f"adapter set {set_index}", fontsize=11)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=80)
    plt.close(figure)
    return out.getvalue()


def _fmt(name: str, value) -> str:
    if value is None:
        return "∞" if name == "psnr_vs_base" else "—"
    return f"{value:.1f}" if name in ("psnr_vs_base", "clip_score") else f"{value:.3f}"


def _number(name: str, value, suffix: str = "") -> str:
    """One number with its explanation as a tooltip."""
    label, what, better = METRICS[name]
    tip = html.escape(f"{label}: {what}. {better.capitalize()}.", quote=True)
    return f"<span class='num' title=\"{tip}\">{html.escape(label)} {_fmt(name, value)}{suffix}</span>"


STYLE = (
    "body{font:14px sans-serif;margin:2em;max-width:1600px}table{border-collapse:collapse;margin:0.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:5px;text-align:center;vertical-align:top}"
    "video.cell{width:180px;image-rendering:pixelated;background:#000}img.plot{max-width:100%}"
    "img.input{width:96px;image-rendering:pixelated;margin-top:4px}"
    "td.moved{background:#fff3cd}.n{font:12px monospace;text-align:left}.num{display:block}"
    "th.suggested,td.suggested{outline:3px solid #2a9d3c;outline-offset:-3px}"
    ".suggestion{font-size:16px;padding:6px 10px;background:#e8f5e9;border-left:5px solid #2a9d3c;display:inline-block}"
    ".notice{margin:4px 0;padding:4px 8px;background:#fff3cd;border-left:4px solid #e0a800}"
    "dl.prov{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dt{font-weight:bold}"
)


def _video(cell: dict, up: str, suggested: bool = False) -> str:
    key = cell["key"]
    return (
        f"<video class='cell' src='{up}videos/{key}.mp4' poster='{up}videos/{key}.png' muted loop autoplay "
        f"playsinline preload='auto' data-key='{key}'></video><br><a href='{up}videos/{key}.mp4'>MP4</a>"
        + (" ★" if suggested else "")
    )


def _cell_numbers(cell: dict) -> str:
    n = cell["numbers"]
    shown = [name for name in METRICS if name in n]
    text = "".join(_number(name, n[name], " dB" if name == "psnr_vs_base" else "") for name in shown)
    text += f"<span class='num'>render {n['render_s']:.2f} s</span>"
    if not cell["evaluated"]:
        text += "<span class='num'>not evaluated</span>"
    if cell["moved"]:
        text += f"<span class='num'>moved: {', '.join(cell['moved'])}</span>"
    return f"<div class='n'>{text}</div>"


def _suggested_text(summary: dict) -> str:
    return "none above 0" if summary["suggested"] is None else f"{summary['suggested']:g}"


def _adapters_text(adapters: list[dict]) -> str:
    return (
        ", ".join(
            f"{html.escape(a.get('name') or a['uri'])} ×{a['weight']:g} (sha256 {a['sha256'][:12]})" for a in adapters
        )
        or "none (the base model)"
    )


def _html(report: dict) -> str:
    up = "../../"  # from batches/<batch>/ to the store's root
    cells, prov = report["cells"], report["provenance"]
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>lorafleet sweep {html.escape(report['batch'])}</title><style>{STYLE}</style>",
        f"<h1>Sweep {html.escape(report['batch'])}</h1>",
        f"<p>{len(cells)} cells in {len(report['sets'])} adapter set(s); every number is in "
        "<a href='report.json'>report.json</a>."
        + (
            f" Cells marked yellow moved since batch {html.escape(report['compared_with'])}."
            if report["compared_with"]
            else ""
        )
        + "</p>",
        "<h2>Suggested lora_scale</h2>",
        f"<p id='rule'>Rule: {html.escape(report['rule'])}. Marked ★ and framed green in each grid.</p><ul>",
    ]
    for s in report["sets"]:
        baseline = ""
        if report["compared_with"]:
            before = (
                _suggested_text({"suggested": s["baseline_suggested"]}) if "baseline_suggested" in s else "not swept"
            )
            baseline = f"; baseline night ({html.escape(report['compared_with'])}): {before}"
        exact = next((c for c in report.get("confirmed", []) if c["set"] == s["set"]), None)
        confirmed = "" if exact is None else f"; exactly: <b>{_suggested_text(exact)}</b>"
        at = f" at {html.escape(_axes_text(s['axes']))}" if s.get("axes") else ""
        parts.append(
            f"<li>set {s['set']} ({_adapters_text(s['adapters'])}){at}: <b class='suggested-scale' data-set='{s['set']}'>"
            f"{_suggested_text(s)}</b>{confirmed}{baseline}{_notices_html(s)}</li>"
        )
    parts.append("</ul><h2>How to read the numbers</h2><ul id='metrics'>")
    for name, (label, what, better) in METRICS.items():
        absent = (
            " <i>(not measured: no CLIP model configured)</i>" if name in CLIP_METRICS and not report["clip"] else ""
        )
        parts.append(
            f"<li class='metric' data-metric='{name}'><b>{label}</b>: {html.escape(what)}. <b>{better.capitalize()}.</b>{absent}</li>"
        )
    parts.append(
        "</ul><p>Per cell, hover a number for its explanation. Each video plays muted in a loop; "
        "MP4 opens the file.</p><h2>Settings and provenance</h2><dl class='prov'>"
    )
    evaluator = prov["evaluator"] or {}
    for label, value in (
        ("model", prov["model"]),
        ("scheduler", prov["scheduler"]),
        ("steps", prov["steps"]),
        ("size", prov["size"]),
        ("guidance scale", prov["guidance_scale"]),
        ("fps", prov["fps"]),
        ("dtype", prov["dtype"]),
        ("rendered", prov["rendered"]),
        ("report written", report["created"]),
        ("lorafleet", prov["lorafleet"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(prov["versions"].items()))),
        ("workers", ", ".join(prov["workers"])),
        ("devices", ", ".join(prov["devices"])),
        ("evaluator", f"CLIP {evaluator.get('clip') or 'none'}, version {evaluator.get('version', '—')}"),
    ):
        parts.append(f"<dt>{label}</dt><dd>{html.escape(str(value))}</dd>")
    parts.append("</dl>")
    swept = [c for c in cells if c.get("tier") is None]
    confirmed = {c["set"]: c for c in report.get("confirmed", [])}
    parts += _axes_overview(report)
    for s in report["sets"]:
        parts += _set_section(s, [c for c in swept if _group_of(c) == (s["set"], _axes_id(s))], up)
        if s["set"] in confirmed:
            parts += _confirmed_section(s, confirmed[s["set"]], [c for c in cells if c["set"] == s["set"]], report, up)
    parts += _side_by_side({**report, "cells": swept}, up)
    parts.append(
        "<h2>Render time per worker</h2><table><tr><th>worker</th><th>jobs</th><th>mean s</th><th>min s</th><th>max s</th><th>variant switches</th></tr>"
    )
    for worker, t in report["render_time_per_worker"].items():
        parts.append(
            f"<tr><td>{html.escape(worker)}</td><td>{t['jobs']}</td><td>{t['mean']:.2f}</td><td>{t['min']:.2f}</td>"
            f"<td>{t['max']:.2f}</td><td>{report['switches'].get(worker, 0)}</td></tr>"
        )
    parts.append("</table>")
    return "\n".join(parts)


def _notices_html(s: dict) -> str:
    return "".join(
        f"<div class='notice' data-kind='{n['kind']}'>⚠ {html.escape(n['text'])}</div>" for n in s["notices"]
    )


def _set_section(s: dict, cells: list[dict], up: str) -> list[str]:
    index, scales, summary = s["set"], s["scales"], s["summary"]
    star = lambda scale: " class='suggested'" if scale == s["suggested"] else ""  # noqa: E731
    pairs = max((m["n"] for at in summary.values() for m in at.values()), default=0)
    at = f" at {html.escape(_axes_text(s['axes']))}" if s.get("axes") else ""
    parts = [
        f"<h2 id='{s['section']}'>Adapter set {index}: {_adapters_text(s['adapters'])}{at}</h2>",
        f"<p class='suggestion'>Suggested lora_scale: <b>{_suggested_text(s)}</b></p>{_notices_html(s)}",
        f"<h3 class='spread'>Mean ± standard deviation over the prompt × seed pairs at each scale (n = {pairs})</h3>"
        "<table><tr><th>number</th>"
        + "".join(f"<th{star(x)}>lora_scale {x:g}{' ★' if x == s['suggested'] else ''}</th>" for x in scales)
        + "</tr>",
    ]
    for name, (label, what, better) in METRICS.items():
        if not any(name in summary[str(x)] for x in scales):
            continue
        tip = html.escape(f"{label}: {what}. {better.capitalize()}.", quote=True)
        row = [f'<tr><th title="{tip}">{label}</th>']
        for x in scales:
            m = summary[str(x)].get(name)
            text = (
                "∞"
                if m is None and name == "psnr_vs_base"
                else "—"
                if m is None
                else f"{_fmt(name, m['mean'])} ± {_fmt(name, m['sd'])}"
            )
            row.append(f'<td{star(x)} title="{tip}">{text}</td>')
        parts.append("".join(row) + "</tr>")
    parts.append(
        f"</table><img src='plots/{s['section']}.png' class='plot' alt='each number against lora_scale, set {index}{at}'>"
    )
    parts.append("<h3>Videos</h3>")

    def td(x, cell):
        classes = "cell" + (" moved" if cell["moved"] else "") + (" suggested" if x == s["suggested"] else "")
        return f"<td class='{classes}'>{_video(cell, up, x == s['suggested'])}{_cell_numbers(cell)}</td>"

    by_place = {(c["lora_scale"], c["prompt"], c["seed"]): c for c in cells}
    rounds = {c["lora_scale"]: c["refined"] for c in cells if c.get("refined")}
    refined = lambda x: f"<br><i class='refined'>refined, round {rounds[x]}</i>" if x in rounds else ""  # noqa: E731
    columns = [(f"<th{star(x)}>lora_scale {x:g}{refined(x)}</th>", x) for x in scales]
    return parts + _grid(cells, columns, lambda x, prompt, seed: by_place[(x, prompt, seed)], td)


def _confirmed_section(draft: dict, exact: dict, cells: list[dict], report: dict, up: str) -> list[str]:
    """A draft set's confirmation: each number's draft and exact means at the scales rendered
    exactly, the suggestion by the same rule on the exact cells, and the videos side by side."""
    index, scales = draft["set"], exact["scales"]
    model = report["confirm_model"] or "the fleet's default model"
    parts = [
        f"<h3 id='confirmed{index}'>Confirmed exactly ({html.escape(model)})</h3>",
        f"<p class='suggestion confirmed'>Suggested lora_scale on the exact renders: <b class='confirmed-scale' "
        f"data-set='{index}'>{_suggested_text(exact)}</b> (the draft's: {_suggested_text(draft)})</p>"
        + _notices_html(exact),
        "<table class='confirmed'><tr><th>number: draft → exact</th>"
        + "".join(f"<th>lora_scale {x:g}</th>" for x in scales)
        + "</tr>",
    ]
    for name, (label, _, _) in METRICS.items():
        row, shown = [f"<tr><th>{label}</th>"], False
        for x in scales:
            a, b = (s["summary"].get(str(x), {}).get(name) for s in (draft, exact))
            shown |= b is not None
            text = " → ".join("—" if m is None else _fmt(name, m["mean"]) for m in (a, b))
            row.append(f"<td>{text}</td>")
        if shown:
            parts.append("".join(row) + "</tr>")
    parts.append("</table>")
    by_place = {(c.get("tier"), c["lora_scale"], c["prompt"], c["seed"]): c for c in cells}
    columns = [(f"<th>lora_scale {x:g}, {tier or 'draft'}</th>", (tier, x)) for x in scales for tier in (None, "exact")]

    def td(column, cell):
        return f"<td class='cell {column[0] or 'draft'}'>{_video(cell, up)}{_cell_numbers(cell)}</td>"

    pick = lambda column, prompt, seed: by_place[(*column, prompt, seed)]  # noqa: E731
    return parts + _grid([c for c in cells if c.get("tier") == "exact"], columns, pick, td)


def _side_by_side(report: dict, up: str) -> list[str]:
    """At each scale (and combination of further axes), the adapter sets as columns: the same prompt
    and seed, set against set."""
    cells = report["cells"]
    if len({s["set"] for s in report["sets"]}) < 2:
        return []
    by_place = {(c["set"], _axes_id(c), c["lora_scale"], c["prompt"], c["seed"]): c for c in cells}
    parts = ["<h2>Adapter sets side by side</h2>"]
    for axes in dict.fromkeys(map(_axes_id, report["sets"])):
        sets = [s for s in report["sets"] if _axes_id(s) == axes]
        at = f", {html.escape(_axes_text(sets[0].get('axes')))}" if axes else ""
        for x in sorted({c["lora_scale"] for c in cells}):
            if x == 0:
                continue  # every set's scale 0 is the base model

            def td(s, cell, x=x):
                return f"<td class='side'>{_video(cell, up, x == s['suggested'])}{_cell_numbers(cell)}</td>"

            columns = [(f"<th>set {s['set']}: {_adapters_text(s['adapters'])}</th>", s) for s in sets]
            pick = lambda s, prompt, seed, x=x, axes=axes: by_place[(s["set"], axes, x, prompt, seed)]  # noqa: E731
            parts += [f"<h3>lora_scale {x:g}{at}</h3>", *_grid(cells, columns, pick, td)]
    return parts


def _axes_overview(report: dict) -> list[str]:
    """With further axes, per adapter set a grid of them against lora_scale: each row a combination
    of the further axes, each cell the mean of the number the rule reads first, ★ on the row's
    suggestion (its videos are in the row's own section below)."""
    sections = [s for s in report["sets"] if s.get("axes")]
    if not sections:
        return []
    name = "clip_score" if report["clip"] else "temporal_ssim"
    parts = [f"<h2 id='grid'>{' × '.join(sections[0]['axes'])} × lora_scale: mean {METRICS[name][0]}</h2>"]
    for index in sorted({s["set"] for s in sections}):
        rows = [s for s in sections if s["set"] == index]
        scales = sorted({x for s in rows for x in s["scales"]})
        parts.append(
            f"<h3>Adapter set {index}: {_adapters_text(rows[0]['adapters'])}</h3><table class='axes'><tr><th></th>"
            + "".join(f"<th>lora_scale {x:g}</th>" for x in scales)
            + "<th>suggested</th></tr>"
        )
        for s in rows:
            cells = []
            for x in scales:
                m = s["summary"].get(str(x), {}).get(name)
                mark = " ★" if x == s["suggested"] else ""
                cells.append(f"<td{' class=suggested' if mark else ''}>{'—' if m is None else _fmt(name, m['mean'])}{mark}</td>")
            label = html.escape(_axes_text(s["axes"]))
            parts.append(
                f"<tr><th><a href='#{s['section']}'>{label}</a></th>{''.join(cells)}<td>{_suggested_text(s)}</td></tr>"
            )
        parts.append("</table>")
    return parts


def _grid(cells: list[dict], columns: list[tuple[str, object]], pick, td) -> list[str]:
    """A table of videos: a row per prompt × seed, a column per (header's HTML, value) of
    `columns`; `pick(value, prompt, seed)` finds a cell and `td(value, cell)` writes it."""
    parts = ["<table><tr><th>prompt, seed</th>" + "".join(header for header, _ in columns) + "</tr>"]
    for prompt, seed in sorted({(c["prompt"], c["seed"]) for c in cells}):
        first = next(c for c in cells if c["prompt"] == prompt)
        image = first.get("image")
        picture = f"<br><img src='images/{image['sha256']}.png' class='input' alt='input image'>" if image else ""
        parts.append(f"<tr><th>{html.escape(first['prompt_text'])}<br>seed {seed}{picture}</th>")
        parts += [td(value, pick(value, prompt, seed)) for _, value in columns]
        parts.append("</tr>")
    parts.append("</table>")
    return parts


def load_report(store: Store, batch: str) -> dict:
    """A previous batch's report.json, for --compare."""
    return json.loads(store.read_bytes(f"batches/{batch}/report.json"))
