"""`lorafleet sweep`: expand a sweep spec, submit it as one batch, wait, have the fleet evaluate
the videos that lack an evaluation by the configured evaluator, and write the report."""

import statistics
import time

import redis
from rich.console import Console

from common.broker import make_app, send_evaluation
from common.evaluation import Evaluation, evaluator_identity, read_evaluation
from common.job import Job
from common.jobs_file import JobLimits
from common.leases import Ledger
from common.manifest import Batch, JobStatus, check_batch_name
from common.model import model_resolver
from common.resolver import AdapterResolver
from common.settings import Settings, queue_for
from common.store import Store, videos_present
from common.sweep_grid import Cell, load_sweep, more_cells
from producer.follow import wait_for_batch
from producer.report import build_report, confirm_scales, load_report, refine_scale
from producer.report.cells import Baseline
from producer.report.rules import axes_text, section_of
from producer.submit import enqueue


def run_sweep(
    path: str,
    settings: Settings,
    console: Console,
    batch_name: str | None = None,
    compare: str | None = None,
    timeout_s: float | None = None,
) -> bool:
    """Run a sweep to its report; returns True when every job was rendered. `compare` names the
    batch to compare with ("latest": the newest earlier batch of this sweep); a baseline that is
    missing is a warning, and the report is written without comparison."""
    store = Store(settings.store_url)
    resolver, limits = AdapterResolver.from_settings(settings, store), JobLimits.from_settings(settings)
    model_for = model_resolver(settings)
    name, jobs, cells, options = load_sweep(path, model_for, resolver, limits)
    # tonight's batch, or tonight's second (-2) if the sweep already ran today; a name given is never reused
    tonight = f"{name}-{time.strftime('%Y%m%d', time.gmtime())}"
    batch = Batch.new(store, batch_name) if batch_name else Batch.new_numbered(store, tonight)
    previous = baseline(store, compare, name, batch.name, console) if compare else None
    enqueue(jobs, batch, store, settings)
    with open(path, "rb") as f:
        store.write_bytes(f"batches/{batch.name}/spec.yaml", f.read())  # what this batch was run from
    console.print(
        f"sweep {batch.name}: {len(jobs)} cells, {batch.enqueued} enqueued, {batch.count(JobStatus.DONE)} already in the store"
    )
    started = time.monotonic()
    left = lambda: None if timeout_s is None else max(60.0, timeout_s - (time.monotonic() - started))  # noqa: E731
    evaluations: dict[str, Evaluation] = {}

    def rendered_and_reported(new_jobs: list[Job]) -> dict | None:
        """Wait for the batch, evaluate `new_jobs`' videos, and write the report of every cell so far."""
        if not wait_for_batch(batch, settings, console, left()):
            console.print("[red]some cells failed: no report[/] (see `lorafleet status " + batch.name + "`)")
            return None
        keys = [job.key for job in new_jobs]
        evaluations.update(evaluate(keys, settings, store, console, queue_for(new_jobs[0].model), left()))
        return build_report(
            batch, store, jobs, cells, evaluations, options, previous,
            max_video_pixels=settings.max_video_pixels, policy=resolver.policy,
        )  # fmt: skip

    def another_round(new_jobs: list[Job], new_cells: list[Cell], said: str) -> dict | None:
        """A further batch step of the same batch (refining, confirming): enqueued, rendered, reported."""
        nonlocal jobs, cells
        enqueue(new_jobs, batch, store, settings)
        jobs, cells = [*jobs, *new_jobs], [*cells, *new_cells]
        console.print(said)
        return rendered_and_reported(new_jobs)

    report = rendered_and_reported(jobs)
    refine = options["refine"]
    for round_ in range(1, refine["rounds"] + 1) if refine and report is not None else ():
        # the next scale of every set that is not yet done, with all its prompts and seeds
        # each section's (an adapter set's, at one combination of the further axes) own next scale
        chosen = [(s, [x]) for s in report["sets"] if (x := refine_scale(s, refine["resolution"])) is not None]
        if not chosen:
            break
        more = more_cells(path, model_for, resolver, limits, by_section(chosen), {"refined": round_})
        report = another_round(*more, f"refining, round {round_}: {scales_text(chosen)}")
    if refine and report is not None:
        console.print("refined: " + "; ".join(f"{section_text(s)}: {s['refinement']['said']}" for s in report["sets"]))
    if report is not None and options["confirm"]:  # a draft night: its decision rests on exact renders
        chosen = [(s, confirm_scales(s)) for s in report["sets"]]
        exact = more_cells(path, model_for, resolver, limits, by_section(chosen), {"tier": "exact"}, exact=True)
        which = scales_text(chosen)
        model = options["confirm"]["model"] or "the default model"
        report = another_round(*exact, f"confirming {len(exact[0])} cells exactly ({model}): {which}")
    if report is None:
        return False
    moved = sum(bool(c.moved) for c in report["cells"])
    compared = f" ({moved} cells moved since {previous.batch})" if previous else ""
    console.print(f"report: {store.uri(f'batches/{batch.name}/report.html')}{compared}")
    return True


def by_section(chosen: list[tuple[dict, list[float]]]) -> dict[tuple[int, str], list[float]]:
    """Scales chosen per report section, as more_cells takes them: by adapter set and axes."""
    return {section_of(s): scales for s, scales in chosen}


def scales_text(chosen: list[tuple[dict, list[float]]]) -> str:
    """"set 0: lora_scale 0.5; set 1 at guidance_scale 8: lora_scale 0.25, 0.5" """
    return "; ".join(f"{section_text(s)}: lora_scale {', '.join(f'{x:g}' for x in scales)}" for s, scales in chosen)


def section_text(s: dict) -> str:
    """A report section as the terminal names it: "set 1 at guidance_scale 8"."""
    return f"set {s['set']}{' at ' + axes_text(s['axes']) if s.get('axes') else ''}"


def estimate_sweep(path: str, settings: Settings, console: Console) -> dict:
    """What a sweep would cost, enqueueing nothing: its cells, the renders they need (cells that
    share a key share a render), how many are in the store already, and the GPU time of the rest on
    the live fleet. Each job's time is scaled from the pace of its queue's workers' last jobs (a
    worker's heartbeat: common/leases/records.py's Pace): its steps × seconds a step, in proportion to its
    pixels, plus the rest of a job's time; averaged over the workers that have a pace. Returns the
    figures it printed."""
    store = Store(settings.store_url)
    resolver = AdapterResolver.from_settings(settings, store)
    name, jobs, _, _ = load_sweep(path, model_resolver(settings), resolver, JobLimits.from_settings(settings))
    renders = {job.key: job for job in jobs}
    present = videos_present(store, list(renders))
    todo = [job for key, job in renders.items() if key not in present]
    console.print(
        f"sweep {name}: {len(jobs)} cells, {len(renders)} renders (cells that share a key share one), "
        f"{len(present)} already in the store, {len(todo)} to render"
    )
    try:
        workers = Ledger.from_settings(settings).live_workers()
    except redis.RedisError as exc:
        console.print(f"Redis unreachable ({type(exc).__name__}): no fleet to estimate GPU time on", style="yellow")
        workers = None
    queues = {}
    for queue in dict.fromkeys(queue_for(job.model) for job in todo):
        queued = [job for job in todo if queue_for(job.model) == queue]
        serving = [w for w in workers or [] if w.queue == queue]
        paces = [w.pace for w in serving if w.pace is not None]
        figures = {"renders": len(queued), "workers": len(serving), "gpu_s": None, "wall_s": None}
        queues[queue] = figures
        if workers is None:
            continue
        if not paces:
            why = (
                "no live worker serves it" if not serving else f"none of its {len(serving)} workers has finished a job"
            )
            console.print(f"queue {queue}: {len(queued)} renders; {why}: no pace to estimate from")
            continue
        seconds = sum(
            statistics.fmean(
                job.steps * p.step_s * job.num_frames * job.height * job.width / p.pixels + p.other_s for p in paces
            )
            for job in queued
        )
        figures.update(gpu_s=seconds, wall_s=seconds / len(serving))
        step_s = statistics.fmean(p.step_s for p in paces)
        console.print(
            f"queue {queue}: {len(queued)} renders, about {_duration(seconds)} of GPU time: {_duration(seconds / len(serving))} "
            f"on its {len(serving)} live worker(s) (their last jobs: {step_s:.2f} s a step; scaled by each job's steps "
            "and pixels)"
        )
    console.print("nothing enqueued (--estimate)")
    return {"cells": len(jobs), "renders": len(renders), "in_store": len(present), "queues": queues}


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def evaluate(
    keys: list[str], settings: Settings, store: Store, console: Console, queue: str, timeout_s: float | None
) -> dict[str, Evaluation]:
    """Each key's evaluation by the evaluator configured now (LORAFLEET_EVAL_CLIP): the ones the
    store lacks, or holds from another evaluator (an earlier night without CLIP, another model),
    are computed by the fleet's workers (`lorafleet.evaluate`) and waited for. A key whose
    evaluation fails is left out, with a warning; the report says it was not evaluated."""
    identity = evaluator_identity(settings)
    found = {}
    for key in dict.fromkeys(keys):
        evaluation = read_evaluation(store, key)
        if evaluation is not None and evaluation.evaluator == identity:
            found[key] = evaluation
    missing = [key for key in dict.fromkeys(keys) if key not in found]
    if not missing:
        console.print(f"evaluations: all {len(found)} videos already evaluated by this evaluator")
        return found
    clip = settings.eval_clip or "none configured (LORAFLEET_EVAL_CLIP): no prompt-adherence numbers"
    console.print(f"evaluating {len(missing)} video(s) on the fleet ({len(found)} already evaluated); CLIP: {clip}")
    app = make_app(settings)
    pending = {key: send_evaluation(app, key, queue) for key in missing}
    started = time.monotonic()
    deadline = started + (timeout_s or 3600)
    warned = False  # of an evaluator that differs from this producer's: said once
    for key, result in pending.items():
        try:
            result.get(timeout=max(1.0, deadline - time.monotonic()), propagate=True)
        except Exception as exc:  # a failure or a timeout: one warning, the rest of the report stands
            console.print(f"warning: {key[:12]} was not evaluated: {exc}", style="yellow")
            continue
        evaluation = read_evaluation(store, key)
        if evaluation is not None:
            found[key] = evaluation
            if evaluation.evaluator != identity and not warned:
                warned = True  # every later night would evaluate it again
                console.print(
                    f"warning: a worker evaluated {key[:12]} with {evaluation.evaluator}, but this producer "
                    f"expects {identity}: set LORAFLEET_EVAL_CLIP alike on the workers and here",
                    style="yellow",
                )
    console.print(f"evaluated {len(missing)} video(s) in {time.monotonic() - started:.1f}s")
    return found


def baseline(store: Store, compare: str, sweep: str, batch: str, console: Console) -> Baseline | None:
    """The report to compare tonight's with, or None (said as a warning): `compare` names a batch,
    or "latest", the newest earlier batch of the same sweep that has a report. Never the batch
    itself: a second run on the same day compares with the run before it, not with itself."""
    if compare == "latest":
        earlier = [
            name
            for name in store.list_folder("batches")
            if name.startswith(f"{sweep}-") and name != batch and store.exists(f"batches/{name}/report.json")
        ]
        if not earlier:
            console.print(
                f"warning: no earlier batch of sweep {sweep} has a report: nothing to compare with", style="yellow"
            )
            return None
        compare = max(earlier, key=lambda name: store.modified(f"batches/{name}/report.json") or name)
    if compare == batch:
        console.print(
            f"warning: --compare {compare} is this run's own batch (a second run today?): not compared; "
            "give --batch a new name, or --compare latest",
            style="yellow",
        )
        return None
    try:
        report = load_report(store, check_batch_name(compare))
    except FileNotFoundError:
        console.print(
            f"warning: batch {compare} has no report in the store: the report is written without comparison",
            style="yellow",
        )
        return None
    except ValueError as exc:  # not JSON, or a cell that is not one lorafleet wrote
        console.print(
            f"warning: batch {compare}'s report.json is not a report lorafleet reads ({str(exc).splitlines()[0]}): "
            "the report is written without comparison",
            style="yellow",
        )
        return None
    console.print(f"comparing with {compare}")
    return report
