"""A sweep report's page: report.html from the report's data, through the Jinja2 template beside
this file (page.html), with autoescape on, so every text that came from a spec, a prompt or a
worker is escaped without anyone having to remember it. What the template shows is prepared here
as plain data: the grids of videos (a row per prompt × seed, a column per scale, set or tier) and
the formatted numbers."""

from jinja2 import Environment, PackageLoader, StrictUndefined

from common.sweep_grid import axes_id
from producer.report.cells import ReportCell
from producer.report.rules import CLIP_METRICS, METRICS, axes_text, section_of

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
UP = "../../"  # from batches/<batch>/ to the store's root, where the videos are
_ENVIRONMENT = Environment(
    loader=PackageLoader("producer.report", "."),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)


def fmt(name: str, value) -> str:
    """A number as the page shows it: PSNR and CLIPScore to 0.1, the rest to 0.001; ∞ for scale 0's PSNR."""
    if value is None:
        return "∞" if name == "psnr_vs_base" else "—"
    return f"{value:.1f}" if name in ("psnr_vs_base", "clip_score") else f"{value:.3f}"


def setting(value) -> str:
    """A provenance setting as the page says it: a swept one (a list) is the sweep's values."""
    if isinstance(value, list):
        return ", ".join(map(str, value)) + " (swept: see each section)"
    return str(value)


def suggested_text(summary: dict) -> str:
    """A section's suggestion as the page says it."""
    return "none above 0" if summary["suggested"] is None else f"{summary['suggested']:g}"


def mean_and_spread(name: str, measured: dict | None) -> str:
    """A number's mean ± standard deviation at one scale (∞ or — where there is none; the mean alone
    at n = 1, where there is no spread to show)."""
    if measured is None or measured["n"] == 1:
        return fmt(name, measured and measured["mean"])
    return f"{fmt(name, measured['mean'])} ± {fmt(name, measured['sd'])}"


def render_page(report: dict) -> str:
    """report.html for a report, as `build_report` makes it (its cells as ReportCells)."""
    cells: list[ReportCell] = report["cells"]
    swept = [c for c in cells if c.tier is None]  # a draft sweep's confirmation aside
    # by section (a set, at one combination of the further axes); a report of before 2026-12-07 named none
    confirmed = {c.get("section", f"set{c['set']}"): c for c in report.get("confirmed", [])}
    sections = []
    drafted = bool(confirmed)  # a draft sweep: its main grids hold the draft model's renders
    for s in report["sets"]:
        own = [c for c in swept if c.section == section_of(s)]
        exact = confirmed.get(s["section"])
        sections.append(
            {
                "set": s,
                "pairs": max((m["n"] for at in s["summary"].values() for m in at.values()), default=0),
                # the numbers measured at some scale of the section: its table's rows
                "metrics": [name for name in METRICS if any(name in s["summary"][str(x)] for x in s["scales"])],
                "grid": scale_grid(s, own),
                "confirmed": exact and confirmed_view(s, exact, [c for c in cells if c.section == section_of(s)]),
            }
        )
    template = _ENVIRONMENT.get_template("page.html")
    return template.render(
        report=report,
        style=STYLE,
        up=UP,
        metrics=METRICS,
        clip_metrics=CLIP_METRICS,
        confirmed=confirmed,
        drafted=drafted,
        set_count=len({s["set"] for s in report["sets"]}),
        sections=sections,
        axes_overview=axes_overview(report, cells),
        side_by_side=side_by_side(report["sets"], swept),
        fmt=fmt,
        setting=setting,
        suggested_text=suggested_text,
        mean_and_spread=mean_and_spread,
        axes_text=axes_text,
    )


def rows_of(cells: list[ReportCell]) -> list[dict]:
    """A grid's rows: one per prompt × seed, with its prompt's text and input image."""
    rows = []
    for prompt, seed in sorted({(c.prompt, c.seed) for c in cells}):
        first = next(c for c in cells if c.prompt == prompt)
        rows.append({"prompt": prompt, "seed": seed, "text": first.prompt_text, "image": first.image})
    return rows


def scale_grid(s: dict, cells: list[ReportCell]) -> dict:
    """A section's videos: a column per scale (★ on the suggestion, the refining round that added it)."""
    by_place = {(c.lora_scale, c.prompt, c.seed): c for c in cells}
    rounds = {c.lora_scale: c.refined for c in cells if c.refined}
    columns = [{"scale": x, "suggested": x == s["suggested"], "refined": rounds.get(x)} for x in s["scales"]]
    rows = rows_of(cells)
    for row in rows:
        row["cells"] = [by_place[(x, row["prompt"], row["seed"])] for x in s["scales"]]
    return {"columns": columns, "rows": rows}


def confirmed_view(draft: dict, exact: dict, cells: list[ReportCell]) -> dict:
    """A draft set's confirmation: each number's draft → exact means at the scales rendered exactly,
    and the videos draft beside exact."""
    scales = exact["scales"]
    numbers = []
    for name, (label, _, _) in METRICS.items():
        pairs = [tuple(s["summary"].get(str(x), {}).get(name) for s in (draft, exact)) for x in scales]
        if any(b is not None for _, b in pairs):
            texts = [" → ".join(fmt(name, m and m["mean"]) for m in pair) for pair in pairs]  # ∞: scale 0's PSNR
            numbers.append({"label": label, "texts": texts})
    by_place = {(c.tier, c.lora_scale, c.prompt, c.seed): c for c in cells}
    columns = [{"scale": x, "tier": tier} for x in scales for tier in (None, "exact")]
    rows = rows_of([c for c in cells if c.tier == "exact"])
    for row in rows:
        row["cells"] = [by_place[(col["tier"], col["scale"], row["prompt"], row["seed"])] for col in columns]
    return {"scales": scales, "numbers": numbers, "grid": {"columns": columns, "rows": rows}}


def side_by_side(sections: list[dict], cells: list[ReportCell]) -> list[dict]:
    """At each scale above 0 (and combination of further axes), the adapter sets as columns: the
    same prompt and seed, set against set. None with one set."""
    if len({s["set"] for s in sections}) < 2:
        return []
    by_place = {(*c.section, c.lora_scale, c.prompt, c.seed): c for c in cells}
    grids = []
    for axes in dict.fromkeys(axes_id(s.get("axes")) for s in sections):
        sets = [s for s in sections if axes_id(s.get("axes")) == axes]
        for x in sorted({c.lora_scale for c in cells}):
            if x == 0:
                continue  # every set's scale 0 is the base model
            rows = rows_of(cells)
            for row in rows:
                row["cells"] = [by_place[(s["set"], axes, x, row["prompt"], row["seed"])] for s in sets]
            at = f", {axes_text(sets[0].get('axes'))}" if axes else ""
            grids.append({"scale": x, "at": at, "sets": sets, "rows": rows})
    return grids


def axes_overview(report: dict, cells: list[ReportCell]) -> dict | None:
    """With further axes: per adapter set, its combinations against lora_scale, each cell the mean
    of the number the rule reads first, ★ on the row's suggestion. None without further axes."""
    sections = [s for s in report["sets"] if s.get("axes")]
    confirmed = {c["section"]: c for c in report.get("confirmed", []) if "section" in c}
    if not sections:
        return None
    name = "clip_score" if report["clip"] else "temporal_ssim"
    sets = []
    for index in sorted({s["set"] for s in sections}):
        rows = [s for s in sections if s["set"] == index]
        scales = sorted({x for s in rows for x in s["scales"]})
        table = []
        for s in rows:
            means = [s["summary"].get(str(x), {}).get(name) for x in scales]
            own = [c for c in cells if c.section == section_of(s)]
            refined = {c.lora_scale for c in own if c.refined}
            exact = {c.lora_scale for c in own if c.tier == "exact"}
            table.append(
                {
                    "section": s,
                    "cells": [
                        {
                            "text": "—" if m is None else fmt(name, m["mean"]),
                            "suggested": x == s["suggested"],
                            "refined": x in refined,
                            "confirmed": x in exact,
                        }
                        for x, m in zip(scales, means, strict=True)
                    ],
                }
            )
            table[-1]["exact"] = confirmed.get(s["section"])  # a draft night: the exact renders' suggestion
        sets.append({"index": index, "adapters": rows[0]["adapters"], "scales": scales, "rows": table})
    return {"axes": list(sections[0]["axes"]), "label": METRICS[name][0], "sets": sets}
