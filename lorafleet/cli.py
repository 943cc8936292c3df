"""`lorafleet`: submit, worker, workers, render, sweep, status, cancel, retry, tiny-model, demo.

One Settings object is built per command from the environment (LORAFLEET_*) and the flags, which
win, and handed down; the environment carries settings only to child processes (a supervisor's
workers). The flags every command shares (--redis-url, --store-url, --default-model, -v) work
before or after the command's name. Workers' modules (and torch) are imported only by the commands
that need them: `submit` never imports torch, and `worker --gpu N` pins the GPU before torch starts.
"""

import functools
import json
import logging
import os
import re
import sys

import click
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from redis import RedisError
from rich.console import Console

import common
from common.errors import ExitCode, InputError, JobFileError, LorafleetError
from common.logs import configure_logging
from common.manifest import JobStatus
from common.settings import Settings, settings_env

# What the `worker` extra brings: commands that render need it, `submit` does not.
WORKER_EXTRA = {
    "torch", "diffusers", "transformers", "peft", "safetensors", "imageio", "imageio_ffmpeg", "sentencepiece", "PIL",
}  # fmt: skip
JSON_COMMANDS = "submit, batches, status and top"  # what takes --json, before or after its name
# A shared flag -> the setting it sets.
SHARED_FLAGS = {"redis_url": "redis_url", "store_url": "store_url", "default_model": "model"}


def make_console(stderr: bool = False) -> Console:
    """Rich output for a terminal; for a log or a pipe, lines that are never wrapped (a path stays
    on one line, a grep finds it)."""
    console = Console(stderr=stderr)
    console.soft_wrap = not console.is_terminal
    return console


def shared_options(command):
    """The flags every command takes, wherever they stand on the command line."""
    for option in reversed(
        (
            click.option("--redis-url", help="broker and results (LORAFLEET_REDIS_URL)"),
            click.option("--store-url", help="the shared store (LORAFLEET_STORE_URL; default ./results)"),
            click.option("--default-model", help="the fleet's default model folder or hub id (LORAFLEET_MODEL)"),
            click.option("-v", "--verbose", is_flag=True, default=None, help="debug logging"),
        )
    ):
        command = option(command)

    @functools.wraps(command)
    def run(**flags):
        given = {**click.get_current_context().find_root().params, **{k: v for k, v in flags.items() if v is not None}}
        overrides = {SHARED_FLAGS[k]: v for k, v in given.items() if k in SHARED_FLAGS and v is not None}
        for name in (*SHARED_FLAGS, "verbose"):
            flags.pop(name, None)
        if click.get_current_context().find_root().params.get("as_json"):  # `lorafleet --json status B`
            if "as_json" not in flags:
                name = click.get_current_context().info_name
                print(f"lorafleet {name}: --json: this command prints no JSON ({JSON_COMMANDS} do)", file=sys.stderr)
                return ExitCode.BAD_INPUT
            flags["as_json"] = True
        try:
            settings = Settings(**overrides)
            configure_logging(settings.log_format, "DEBUG" if given.get("verbose") else settings.log_level)
            return command(settings=settings, console=make_console(), **flags)
        except JobFileError as exc:
            print(exc, file=sys.stderr)  # plain lines, never wrapped: one error a line, easy to grep
            return ExitCode.BAD_INPUT
        except ValidationError as exc:  # a setting in the environment
            for line in setting_errors(exc):
                print(line, file=sys.stderr)
            return ExitCode.BAD_INPUT
        except (LorafleetError, click.BadParameter) as exc:
            print(f"lorafleet {click.get_current_context().info_name}: {exc}", file=sys.stderr)
            return exc.exit_code if isinstance(exc, LorafleetError) else ExitCode.BAD_INPUT
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in WORKER_EXTRA:
                print(f"lorafleet: this command needs {exc.name}: pip install 'lorafleet[worker]'", file=sys.stderr)
                return ExitCode.FAILED
            raise
        except (RedisError, OperationalError) as exc:
            url = re.sub(r"://([^@/]*):[^@/]*@", r"://\1:***@", settings.redis_url)  # never print a password
            print(
                f"lorafleet {click.get_current_context().info_name}: cannot use Redis at {url}: {exc}", file=sys.stderr
            )
            return ExitCode.REDIS_UNREACHABLE
        except KeyboardInterrupt:
            return ExitCode.INTERRUPTED

    return run


def setting_errors(exc: ValidationError) -> list[str]:
    """A settings error as lines naming the variable and the place in it: `lorafleet:
    LORAFLEET_MODELS: draft.cache: …` (a union's failed alternatives are left out where another
    one came further)."""
    lines = []
    errors = exc.errors()
    for error in errors:
        name, *place = error["loc"]
        place = [str(part) for part in place if part not in ("str", "ModelTier")]  # LORAFLEET_MODELS' union
        if error["type"] == "string_type" and len(errors) > 1:
            continue  # the union's "a plain string" alternative, beside the error that matters
        where = f"{'.'.join(place)}: " if place else ""
        line = f"lorafleet: LORAFLEET_{str(name).upper()}: {where}{error['msg'].removeprefix('Value error, ')}"
        lines.append((line if place else f"{line}, got {error['input']!r}")[:300])
    return lines


def device_options(command):
    """Where a rendering command runs, and which model it serves."""
    for option in reversed(
        (
            click.option("--gpu", type=int, help="pin to this GPU (sets CUDA_VISIBLE_DEVICES before torch starts)"),
            click.option("--device", type=click.Choice(["cpu", "cuda"]), help="the CPU, or the first visible GPU"),
            click.option("--model", "alias", metavar="ALIAS", help="serve this model alias (LORAFLEET_MODELS)"),
            click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the transformer"),
        )
    ):
        command = option(command)
    return command


def _with_compile(settings: Settings, compile_: bool | None) -> Settings:
    return settings.model_copy(update={"compile": True}) if compile_ else settings


def _pick_device(gpu: int | None, device: str | None, cpu_fallback: bool = False) -> tuple[str, int | None]:
    """The torch device and GPU index for a worker; pins the GPU before torch is imported. With no
    GPU visible and no --device, a worker refuses to start (it would take GPU jobs at CPU speed);
    `render` (`cpu_fallback`) runs on the CPU and says so."""
    if gpu is not None and device is not None:
        raise click.BadParameter("give --gpu N or --device, not both")
    # Memory freed between phases (the decode after the denoise) is reusable at any size, so the
    # reserved memory stays near what the memory plan estimated (an H200's resident 2B run reserved 36.5 GB instead of 39.7).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # for this process's CUDA, not a setting
        return "cuda:0", gpu
    if device == "cpu":
        return "cpu", None
    import torch

    if torch.cuda.is_available():
        return "cuda:0", 0
    if device == "cuda":
        raise InputError("--device cuda: no GPU is visible to torch here")
    if not cpu_fallback:
        raise InputError("no GPU is visible to torch here: pass --device cpu to run a CPU worker")
    logging.getLogger("lorafleet").warning("no GPU visible: running on the CPU (say --device cpu to silence this)")
    return "cpu", None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(common.__version__, "--version", prog_name="lorafleet")
@click.option("--redis-url", hidden=True)
@click.option("--store-url", hidden=True)
@click.option("--default-model", hidden=True)
@click.option("-v", "--verbose", is_flag=True, default=None, hidden=True)
@click.option("--json", "as_json", is_flag=True, default=None, hidden=True)
def cli(**_):
    """Render CogVideoX + LoRA videos on a GPU fleet.

    Settings come from the environment (LORAFLEET_*); the shared flags (--redis-url, --store-url,
    --default-model, -v) override them, before or after the command's name, as does --json (for
    submit, batches, status and top).
    """


def follow(batch, settings: Settings, console: Console, timeout_s: float | None) -> bool:
    """Wait for a batch as `wait_for_batch` does; on Ctrl-C, say that the jobs stay queued and how
    to follow them, then end (exit 130)."""
    from producer.follow import wait_for_batch

    try:
        return wait_for_batch(batch, settings, console, timeout_s)
    except KeyboardInterrupt:
        console.print(
            f"interrupted: the jobs of batch {batch.name} stay queued and keep rendering; "
            f"follow them with `lorafleet wait {batch.name}`, stop them with `lorafleet cancel {batch.name}`",
            markup=False,
        )
        raise


def needs_redis(command):
    """A command that talks to Redis asks it first, with short timeouts: down, it exits 3 in
    seconds (one line) rather than after the minute a fleet's clients spend riding out a restart."""

    @functools.wraps(command)
    def run(settings: Settings, **flags):
        from common.broker import check_redis

        check_redis(settings.redis_url)
        return command(settings=settings, **flags)

    return run


def timeout_option(command):
    """--timeout for every command that waits."""
    return click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(min=0),
        help="stop waiting after this many seconds (exit 7); the jobs stay queued: `lorafleet wait BATCH` follows them",
    )(command)


def json_option(command):
    """--json: the result as one JSON object on stdout; progress goes to stderr."""
    return click.option("--json", "as_json", is_flag=True, help="print the result as JSON (progress on stderr)")(
        command
    )


@cli.command(short_help="Check a jobs file and enqueue it as one batch")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--wait", is_flag=True, help="show progress until every job ends")
@click.option("--batch", help="batch name (default: the time and a random suffix)")
@click.option(
    "--priority",
    type=click.Choice(["high", "normal", "low"]),
    default="normal",
    show_default=True,
    help="workers take high before normal before low (a sweep's); a line's own priority wins",
)
@timeout_option
@json_option
@shared_options
def submit(settings: Settings, console: Console, file: str, wait: bool, batch, priority: str, timeout_s, as_json):
    """Check every line of FILE (.jsonl, one job a line), expand its lists, enqueue what is not in the store."""
    from producer.submit import submit as submit_file

    console = make_console(stderr=True) if as_json else console
    submitted = submit_file(file, settings, batch, priority)
    queued, done = submitted.enqueued, submitted.count(JobStatus.DONE)
    console.print(
        f"batch {submitted.name}: {len(submitted.entries)} jobs, {queued} enqueued, {done} already in the store"
    )
    ok = True
    if wait or timeout_s is not None:
        ok = follow(submitted, settings, console, timeout_s)
    if as_json:
        entries = [entry.as_dict() for entry in submitted.entries]
        print(json.dumps({"batch": submitted.name, "enqueued": queued, "entries": entries}))
    return ExitCode.OK if ok else ExitCode.JOBS_FAILED


@cli.command(short_help="Follow a batch until every job ends")
@click.argument("batch")
@timeout_option
@shared_options
@needs_redis
def wait(settings: Settings, console: Console, batch: str, timeout_s):
    """Follow a submitted BATCH until every job ends (or --timeout passes)."""
    from common.manifest import Batch
    from common.store import Store

    followed = Batch.load(Store(settings.store_url), batch)
    return ExitCode.OK if follow(followed, settings, console, timeout_s) else ExitCode.JOBS_FAILED


@cli.command(short_help="List the batches in the store with their counts")
@json_option
@shared_options
def batches(settings: Settings, console: Console, as_json: bool):
    """The batches in the store: name, when submitted, jobs, counts as last recorded, sweep or not."""
    from common.store import Store
    from producer.follow import list_batches

    found = list_batches(Store(settings.store_url))
    if as_json:
        print(json.dumps(found))
        return ExitCode.OK
    for entry in found:
        counts = ", ".join(f"{n} {state}" for state, n in entry["counts"].items())
        kind = "sweep" if entry["sweep"] else "batch"
        print(f"{entry['name']}  {entry['submitted'] or '?'}  {kind}  {entry['jobs']} jobs: {counts}")
    if not found:
        print(f"no batches in {settings.store_url}")
    return ExitCode.OK


@cli.command(short_help="Run a sweep spec as one batch and write its report")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--batch", help="batch name (default: the spec's name and today's date)")
@click.option(
    "--compare",
    metavar="BATCH",
    help='mark the cells whose numbers moved since that sweep; "latest": the newest earlier batch of this sweep',
)
@click.option(
    "--estimate",
    is_flag=True,
    help="enqueue nothing: print the cells, the renders already in the store and the GPU time of the rest on the "
    "live fleet",
)
@timeout_option
@shared_options
@needs_redis
def sweep(
    settings: Settings, console: Console, file: str, batch: str | None, compare: str | None, estimate: bool, timeout_s
):
    """Run a sweep spec FILE (YAML or JSON) as one batch, wait for it, and write its report."""
    from producer.sweep import estimate_sweep, run_sweep

    if estimate:
        estimate_sweep(file, settings, console)
        return ExitCode.OK
    ok = run_sweep(file, settings, console, batch, compare, timeout_s)
    return ExitCode.OK if ok else ExitCode.JOBS_FAILED


@cli.command(short_help="Count a batch's jobs by state; name each failure")
@click.argument("batch")
@json_option
@shared_options
def status(settings: Settings, console: Console, batch: str, as_json: bool):
    """Counts by state and each failure's reason; brings the manifest up to date."""
    from producer.follow import status as batch_status

    shown = batch_status(settings, batch, make_console(stderr=True) if as_json else console, as_json)
    # as `wait` ends: 1 when any job failed or was cancelled
    return ExitCode.JOBS_FAILED if shown.count(JobStatus.FAILED) + shown.count(JobStatus.CANCELLED) else ExitCode.OK


@cli.command(short_help="Cancel a batch, or one job of it")
@click.argument("batch")
@click.option("--job", metavar="ID|KEY", help="only this job: its id, or its key (8 hex digits or more)")
@shared_options
@needs_redis
def cancel(settings: Settings, console: Console, batch: str, job: str | None):
    """Queued jobs of BATCH never start; running ones stop at their next denoising step."""
    from producer.control import cancel as cancel_batch

    cancel_batch(settings, batch, console, job)
    return ExitCode.OK


@cli.command(short_help="Hold a batch's queued jobs until resume")
@click.argument("batch")
@shared_options
@needs_redis
def pause(settings: Settings, console: Console, batch: str):
    """Queued jobs of BATCH are not started until `resume`; running ones finish."""
    from producer.control import pause as pause_batch

    pause_batch(settings, batch, console)
    return ExitCode.OK


@cli.command(short_help="Send again the jobs of a paused batch")
@click.argument("batch")
@shared_options
@needs_redis
def resume(settings: Settings, console: Console, batch: str):
    """Go on with a paused BATCH: the jobs set aside meanwhile are queued again."""
    from producer.control import resume as resume_batch

    resume_batch(settings, batch, console)
    return ExitCode.OK


@cli.command(short_help="Send a batch's unsent jobs; enqueue failed ones again")
@click.argument("batch")
@click.option("--wait", is_flag=True, help="show progress until every job ends")
@timeout_option
@shared_options
@needs_redis
def retry(settings: Settings, console: Console, batch: str, wait: bool, timeout_s):
    """Send the jobs of BATCH that an interrupted submit left unsent (each once), and enqueue its
    failed and cancelled jobs again."""
    from producer.control import retry as retry_batch

    again = retry_batch(settings, batch, console)
    if (wait or timeout_s is not None) and not follow(again, settings, console, timeout_s):
        return ExitCode.JOBS_FAILED
    return ExitCode.OK


@cli.command(short_help="Run one worker on one GPU (or the CPU)")
@device_options
@shared_options
def worker(settings: Settings, console: Console, gpu, device, alias, compile_):
    """One Celery worker pinned to one device, serving one model's queue."""
    where, index = _pick_device(gpu, device)
    from workers.worker import Worker, worker_name

    return Worker(_with_compile(settings, compile_), where, worker_name(index), alias).run()


@cli.command(short_help="Run one supervised worker per GPU of this host")
@click.option("--gpus", help='"all" (the default) or a list such as 0,2')
@click.option("--cpus", type=click.IntRange(min=1), help="run N workers on the CPU instead (hosts without GPUs)")
@click.option("--model", "alias", metavar="ALIAS", help="serve this model alias (LORAFLEET_MODELS)")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile each worker's transformer")
@shared_options
def workers(settings: Settings, console: Console, gpus: str | None, cpus: int | None, alias, compile_):
    """One supervised worker per GPU of this host, restarted when it dies."""
    from workers.supervisor import list_gpus, run_workers, worker_slots

    if gpus is not None and cpus is not None:
        raise click.BadParameter("give --gpus or --cpus, not both")
    slots = worker_slots([], cpus) if cpus else worker_slots(list_gpus(gpus or "all"))
    env = settings_env(_with_compile(settings, compile_))
    return run_workers(slots, ["--model", alias] if alias else [], env)


@cli.command(short_help="Render a jobs file in this process, without Redis")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", help="the store to write into (LORAFLEET_STORE_URL)")
@click.option("--batch", help="batch name for the manifest")
@device_options
@shared_options
def render(settings: Settings, console: Console, file, out, batch, gpu, device, alias, compile_):
    """Render the jobs of FILE in this process, without Redis: one-off runs and debugging."""
    where, _ = _pick_device(gpu, device, cpu_fallback=True)
    from lorafleet.local_render import render_file

    update = {"store_url": out} if out else {}
    if alias:  # the jobs that name no model render on ALIAS's
        tier = settings.model_tier(alias)
        update.update(model=tier.ref, precision=tier.precision, compile=tier.compile, attention=tier.attention)
    settings = _with_compile(settings.model_copy(update=update), compile_)
    rendered = render_file(file, settings, where, console, batch)
    return ExitCode.JOBS_FAILED if rendered.count(JobStatus.FAILED) else ExitCode.OK


@cli.command(short_help="Exit 0 if a worker's heartbeat is fresh")
@click.option("--worker", "name", metavar="NAME", help="this worker (gpu0@host, as its log names it); default: any")
@shared_options
@needs_redis
def health(settings: Settings, console: Console, name: str | None):
    """Exit 0 if the worker's heartbeat in Redis is fresh (without --worker: any worker's), else 1."""
    import time

    from common.leases import Ledger

    live = {record.worker: record for record in Ledger.from_settings(settings).live_workers()}
    shown = [name] if name else sorted(live)
    for worker in shown:
        record = live.get(worker)
        # Names and keys come from Redis, where any client may write: printed as text, never as markup.
        if record is None:
            console.print(f"{worker}: no fresh heartbeat in Redis (stopped, hung, or not READY yet)", markup=False)
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.since))
            ago = time.time() - record.beat
            job = record.job
            doing = f"running {job.key[:12]} for {time.time() - job.since:.0f}s" if job else "idle"
            console.print(
                f"{worker}: alive, serving queue {record.queue} since {since}, {doing}, last beat {ago:.0f}s ago",
                markup=False,
            )
    if not live and not name:
        console.print("no worker has a fresh heartbeat in Redis")
    return ExitCode.OK if (name in live if name else live) else ExitCode.UNHEALTHY


@cli.command(short_help="Serve the fleet's numbers to Prometheus and KEDA")
@click.option("--port", type=int, default=9401, show_default=True, help="serve /metrics on this port")
@click.option("--batches", type=click.IntRange(min=0), default=20, show_default=True, help="newest batches to count")
@shared_options
def exporter(settings: Settings, console: Console, port: int, batches: int):
    """Serve the fleet's queue lengths, running jobs, live workers and batch states for Prometheus."""
    from producer.exporter import run_exporter

    run_exporter(settings, port, batches)


@cli.command(short_help="The fleet at a glance, live")
@click.option("--once", is_flag=True, help="print one snapshot and exit (as when the output is not a terminal)")
@json_option
@click.option(
    "--interval", "interval_s", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
    help="seconds between refreshes",
)  # fmt: skip
@shared_options
@needs_redis
def top(settings: Settings, console: Console, once: bool, as_json: bool, interval_s: float):
    """The fleet at a glance: queues by priority, live workers and their jobs, running batches with an ETA."""
    from producer.top import run_top

    run_top(settings, console, once, as_json, interval_s)
    return ExitCode.OK


@cli.command(short_help="Remove old batches and the outputs no batch needs")
@click.option("--older-than", "older_than", metavar="DURATION", help="batches submitted this long ago: 30d, 12h, 2w")
@click.option("--before", metavar="TIME", help="batches submitted before this time: 2026-11-01, 2026-11-01T12:00:00Z")
@click.option("--dry-run", is_flag=True, help="say what would go; remove nothing")
@shared_options
def prune(settings: Settings, console: Console, older_than: str | None, before: str | None, dry_run: bool):
    """Remove batches submitted before the cutoff and the stored files no remaining batch references."""
    from common.broker import check_redis
    from common.leases import Ledger
    from common.store import Store
    from common.store_lock import StoreLock
    from producer.prune import cutoff_before, parse_duration, parse_time
    from producer.prune import prune as prune_store

    if (older_than is None) == (before is None):
        raise click.BadParameter("give --older-than DURATION or --before TIME (one of them)")
    cutoff = cutoff_before(parse_duration(older_than)) if older_than else parse_time(before)
    if not dry_run:  # the store lock lives in Redis: without it a submit could call a deleted video done
        check_redis(settings.redis_url)
    lock = None if dry_run else StoreLock(settings.redis_url)
    removed = prune_store(Store(settings.store_url), cutoff, console, lock)
    if not dry_run:  # the batches' cancel and pause flags and sent counters go with them
        ledger = Ledger.from_settings(settings)
        for name in removed.batches if not removed.failed else []:
            ledger.forget_batch(name)
    return ExitCode.FAILED if removed.failed else ExitCode.OK


@cli.command(name="redis", short_help="Start a private redis-server in the background")
@click.option("--dir", "directory", default="demo/redis", show_default=True, help="its data, pid and log")
@click.option("--stop", is_flag=True, help="stop the one started from --dir")
@shared_options
def redis_command(settings: Settings, console: Console, directory: str, stop: bool):
    """Start a private redis-server in the background (a free port, append-only, files in --dir) and
    print `export LORAFLEET_REDIS_URL=...`: `eval "$(lorafleet redis)"`. Run again: the same server."""
    from lorafleet.redis_server import start_in_background, stop_background

    if stop:
        stopped = stop_background(directory)
        print(f"# stopped the redis-server of {directory}" if stopped else f"# no redis-server runs from {directory}")
        return ExitCode.OK
    url = start_in_background(directory)
    print(
        f"export LORAFLEET_REDIS_URL={url}  # a private redis-server, files in {directory}; stop: lorafleet redis --stop"
    )
    return ExitCode.OK


@cli.command(name="tiny-model", short_help="Build the tiny model and adapters")
@click.argument("directory", metavar="DIR")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random weights")
@click.option(
    "--kind",
    type=click.Choice(["t2v", "i2v", "t2v-1.5", "i2v-1.5"]),
    default="t2v",
    show_default=True,
    help="CogVideoX text-to-video, image-to-video (5B-I2V), or their 1.5 versions",
)
@shared_options
def tiny_model(settings: Settings, console: Console, directory: str, seed: int, kind: str):
    """Build the tiny pipeline (DIR/model: random weights, the text-to-video kind's transformer trained
    for about 20 s to render still videos), two adapters (DIR/adapters/{style,subject}), a tiny random
    CLIP for evaluations (DIR/clip) and, for an image-to-video kind, two input images
    (DIR/images/{sunset,tiles}.png)."""
    from workers.tiny_model import write_tiny_model

    for name, path in write_tiny_model(directory, seed, kind).items():
        console.print(f"{name}: {path}")
    return ExitCode.OK


@cli.command(short_help="Print the JSON Schema of a job")
@shared_options
def schema(settings: Settings, console: Console):
    """Print the JSON Schema of a job: one line of a jobs file, or a `lorafleet.render` message."""
    from common.job_spec import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return ExitCode.OK


@cli.command(short_help="Run the whole flow on the tiny model, here")
@click.option("--sweep", "spec", metavar="SPEC", type=click.Path(dir_okay=False), help="run this sweep spec instead")
@click.option(
    "--kind",
    type=click.Choice(["t2v", "i2v"]),
    default="t2v",
    show_default=True,
    help="i2v: the tiny image-to-video model and examples/i2v.jsonl, with the input images it writes",
)
@shared_options
def demo(settings: Settings, console: Console, spec: str | None, kind: str):
    """The tiny model, a private Redis, one CPU worker, and examples/prompts.jsonl submitted with --wait."""
    from lorafleet.demo import run_demo

    return run_demo(console, spec, kind)


def main(argv: list[str] | None = None) -> int:
    """Run one lorafleet command; returns its exit code."""
    try:
        code = cli.main(args=argv, prog_name="lorafleet", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return ExitCode.BAD_INPUT
    except click.exceptions.Abort:
        return ExitCode.INTERRUPTED
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
