"""A sweep report's numbers and rules, no HTML: each section's mean and spread per scale, the
suggested scale by the rule the page states, the notices where a suggestion sits at an edge of the
swept range or cannot be told from the scale the rule turned down (PAIRED_RULE), the next refining
scale and why refining stopped, the scales a draft is confirmed at, the cells that moved since a
baseline night, and the provenance. Plain data in and out: table-tested without videos or torch
(tests/unit/test_report_rules.py)."""

import json
import statistics
from collections.abc import Iterable

import common
from common.evaluation import Evaluation
from common.job import Job, adapter_combination
from common.sweep_grid import axes_id
from producer.report.cells import ReportCell, VideoMetadata

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


def section_of(summary: dict) -> tuple[int, str]:
    """A section summary's place, as a cell's `section` says it: its adapter set and axes."""
    return summary["set"], axes_id(summary.get("axes"))


def groups(cells: list[ReportCell]) -> list[tuple[int, str]]:
    """The report's sections: one per adapter set and combination of the further axes, in sweep order."""
    return list(dict.fromkeys(sorted((c.section for c in cells), key=lambda g: g[0])))


def section(
    group: tuple[int, str], cells: list[ReportCell], suggest: dict, clip: bool, top: float | None = None
) -> dict:
    """One section's summary: an adapter set's, or with further axes, the set's at one combination of
    them ({"axes": {...}}); `section` names its plot and its place in the page. `top` is the largest
    scale swept when these cells hold only some of the sweep's scales (a draft's exact confirmation)."""
    index, axes = group
    ordinal = [g for g in groups(cells) if g[0] == index].index(group)
    summary = summarise(index, [c for c in cells if c.section == group], suggest, clip, top)
    if not axes:
        return {**summary, "section": f"set{index}"}
    return {**summary, "axes": json.loads(axes), "section": f"set{index}-a{ordinal}"}


def axes_text(axes: dict | None) -> str:
    return ", ".join(f"{name} {value if isinstance(value, str) else f'{value:g}'}" for name, value in (axes or {}).items())


def distinguishable(a: list[float], b: list[float]) -> bool:
    """Whether two scales' values of one number, paired by prompt and seed, differ by PAIRED_RULE."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    if len(differences) < MIN_PAIRS:
        return False
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    return abs(mean) > 2 * sd / len(differences) ** 0.5


def summarise(index: int, cells: list[ReportCell], suggest: dict, clip: bool, top: float | None = None) -> dict:
    """Mean and standard deviation of each number at each scale across prompts × seeds, the
    suggested scale, and what the page should say about it (`notices`)."""
    scales = sorted({c.lora_scale for c in cells})
    summary = {}
    for scale in scales:
        at = [c.numbers for c in cells if c.lora_scale == scale]
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
        "notices": notices(cells, scales, suggested, rule_numbers, max(scales) if top is None else top),
        "set": index,
        "adapters": cells[0].adapters,
        # the set's identity across nights (at scale 0 every combination is empty: ask at scale 1)
        "combination": [list(term) for term in adapter_combination(cells[0].adapters, 1.0)],
        "scales": scales,
        "summary": summary,
        "suggested": suggested,
    }


def notices(
    cells: list[ReportCell], scales: list[float], suggested: float | None, numbers: list[str], top: float
) -> list[dict]:
    """What to know before trusting a suggestion, each {"kind", "text"}: it sits at an edge of the
    swept range, whose largest scale is `top` (extend the range that way), or the scale it passed and
    the next one up, which the rule turned down, cannot be told apart at this sample size
    (PAIRED_RULE on the rule's numbers)."""
    found = []
    positive = [x for x in scales if x > 0]
    if suggested is not None and suggested == top:
        found.append({
            "kind": "edge-high",
            "text": f"{suggested:g} is the largest lora_scale swept: a larger one may pass the rule too; "
            f"extend lora_scales above {suggested:g}",
        })  # fmt: skip
    elif suggested is None and positive:
        found.append({
            "kind": "edge-low",
            "text": f"no lora_scale above 0 passes the rule: the line lies between 0 and {positive[0]:g}; "
            f"sweep smaller scales there",
        })  # fmt: skip
    passed = 0.0 if suggested is None else suggested
    turned_down = next((x for x in scales if x > passed), None)
    if turned_down is not None and passed in scales:

        def paired(scale: float, name: str) -> dict:
            return {(c.prompt, c.seed): c.numbers.get(name) for c in cells if c.lora_scale == scale}

        told_apart, pairs = False, 0
        for name in numbers:
            a, b = paired(passed, name), paired(turned_down, name)
            both = [place for place in a if place in b and a[place] is not None and b[place] is not None]
            pairs = max(pairs, len(both))
            told_apart |= distinguishable([a[p] for p in both], [b[p] for p in both])
        if not told_apart:
            found.append({
                "kind": "indistinguishable",
                "text": f"lora_scale {passed_text(suggested)} and {turned_down:g} (turned down) are not distinguishable at "
                f"this sample size (n = {pairs} prompt × seed pairs; rule: {PAIRED_RULE}): add prompts or seeds "
                "before trusting the suggestion",
            })  # fmt: skip
    return found


def passed_text(suggested: float | None) -> str:
    """The scale the rule passed, as a notice names it: scale 0 when none above it passed."""
    return "0 (the reference)" if suggested is None else f"{suggested:g} (passed)"


def rule_text(suggest: dict, clip: bool) -> str:
    if clip:
        return (
            f"the largest lora_scale above 0 whose mean CLIPScore is at most {suggest['clip_score_drop']:g} below "
            f"scale 0's and whose mean CLIP consistency is at most {suggest['consistency_drop']:g} below scale 0's"
        )
    return (
        f"no CLIP model is configured (LORAFLEET_EVAL_CLIP), so prompt adherence is not measured: the largest "
        f"lora_scale above 0 whose mean temporal SSIM is at most {suggest['consistency_drop']:g} below scale 0's"
    )


def provenance(jobs: list[Job], metadata: dict[str, VideoMetadata], evaluations: dict[str, Evaluation]) -> dict:
    """The settings every cell shares; a setting the sweep varies (an axis) is the list of its values."""
    meta = metadata[jobs[0].key]
    evaluator = next((e.evaluator for e in evaluations.values()), None)
    return {
        "model": meta.model,
        "scheduler": meta.scheduler,
        "steps": one_or_all(job.steps for job in jobs),
        "size": one_or_all(f"{job.num_frames} frames × {job.height} × {job.width}" for job in jobs),
        "guidance_scale": one_or_all(job.guidance_scale for job in jobs),
        "fps": one_or_all(job.fps for job in jobs),
        "dtype": meta.dtype,
        "lorafleet": common.__version__,
        "versions": meta.versions,
        "workers": sorted({m.worker for m in metadata.values()}),
        "devices": sorted({m.device for m in metadata.values()}),
        "rendered": f"{min(m.rendered_at for m in metadata.values())} to {max(m.rendered_at for m in metadata.values())}",
        "evaluator": evaluator,
    }


def one_or_all(values: Iterable):
    """The one value all cells share, or every value the sweep took, in order."""
    found = sorted(set(values))
    return found[0] if len(found) == 1 else found


def render_times(metadata: dict[str, VideoMetadata]) -> dict[str, dict]:
    """Render seconds per worker: jobs, mean, min, max (a number per worker, not a plot of noise)."""
    times: dict[str, list[float]] = {}
    for meta in metadata.values():
        times.setdefault(meta.worker, []).append(meta.timings_s.total)
    return {
        worker: {"jobs": len(t), "mean": statistics.fmean(t), "min": min(t), "max": max(t)}
        for worker, t in sorted(times.items())
    }


def identity(cell: ReportCell) -> tuple:
    """What makes two nights' cells the same cell: the adapters' content, prompt, seed, scale, tier and axes."""
    combination = adapter_combination(cell.adapters, cell.lora_scale)
    return combination, cell.prompt_text, cell.seed, cell.lora_scale, cell.tier, axes_id(cell.axes)


def refine_scale(summary: dict, resolution: float) -> float | None:
    """The next scale a refining sweep adds to a set, or None when it is done: halfway between the
    suggestion (0 when none) and the next scale up, which the rule turned down, while that gap is
    wider than `resolution` and the two can be told apart (PAIRED_RULE); never past the range swept."""
    return _refine(summary, resolution)[0]


def refinement(summary: dict, cells: list[ReportCell], refine: dict) -> dict:
    """What a refining sweep did to a section, for the page: the scale each round added and why
    refinement stopped (or, in a report written between rounds, what the next round adds)."""
    added = sorted({(c.refined, c.lora_scale) for c in cells if c.refined})
    following, why = _refine(summary, refine["resolution"])
    if following is None:
        said = f"stopped: {why}"
    elif len(added) >= refine["rounds"]:
        said = f"stopped: the {refine['rounds']} round(s) the spec allows are spent (the next would add {following:g})"
    else:
        said = f"the next round adds {following:g}"
    return {"rounds": [scale for _, scale in added], "said": said}


def _refine(summary: dict, resolution: float) -> tuple[float | None, str]:
    """refine_scale's answer, and when it is None, why."""
    scales, suggested = summary["scales"], summary["suggested"]
    passed = 0.0 if suggested is None else suggested
    above = [x for x in scales if x > passed]
    if not above:
        return None, f"{passed:g} passed and is the largest scale swept: there is no scale above it to refine toward"
    pair = f"{passed_text(suggested)} and {above[0]:g} (turned down)"
    if above[0] - passed <= resolution + 1e-9:
        return None, f"{pair} are {above[0] - passed:g} apart, within the resolution {resolution:g}"
    if any(n["kind"] == "indistinguishable" for n in summary["notices"]):
        return None, f"{pair} cannot be told apart at this sample size (see the notice)"
    return round((passed + above[0]) / 2, 6), ""


def confirm_scales(summary: dict) -> list[float]:
    """The scales a draft sweep's set is rendered at again, exactly: scale 0 (the rule's reference),
    the suggested scale and its neighbours in the sweep (none suggested: the smallest above 0)."""
    scales, suggested = summary["scales"], summary["suggested"]
    if suggested is None:
        return sorted({0.0, *[x for x in scales if x > 0][:1]})
    at = scales.index(suggested)
    return sorted({0.0, *scales[max(at - 1, 0) : at + 2]})


def mark_moved(cells: list[ReportCell], previous: list[ReportCell], thresholds: dict) -> list[ReportCell]:
    """The cells, each with the numbers that moved by more than their threshold since the same cell
    (`identity`) in a baseline night's report."""
    before = {identity(c): c.numbers for c in previous}
    return [
        cell.model_copy(update={"moved": moved(cell.numbers, before.get(identity(cell)), thresholds)})
        for cell in cells
    ]


def moved(now: dict, old: dict | None, thresholds: dict) -> list[str]:
    """The numbers that moved between two nights' measurements of one cell."""
    found = []
    for name, threshold in thresholds.items():
        if old is None or name not in now or name not in old:
            continue  # not measured on one of the nights (no CLIP then)
        a, b = (100.0 if v is None else v for v in (now[name], old[name]))  # None: identical
        if abs(a - b) > threshold:
            found.append(name)
    return found


def switches(metadata: dict[str, VideoMetadata]) -> dict[str, int]:
    """Variant switches each worker made for this batch."""
    counts: dict[str, int] = {}
    for meta in metadata.values():
        counts[meta.worker] = counts.get(meta.worker, 0) + int(meta.variant_switched)
    return counts
