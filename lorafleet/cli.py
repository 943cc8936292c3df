"""`lorafleet`: submit, worker, workers, render, tiny-model, demo.

Flags map onto settings (common/settings.py) by being written into the environment as
LORAFLEET_* before the settings are read, so worker processes started from here inherit them.
Workers' modules (and torch) are imported only by the commands that need them: `submit` never
imports torch, and `worker --gpu N` pins the GPU before torch starts.
"""

import argparse
import logging
import os
import re
import sys

from kombu.exceptions import OperationalError
from redis import RedisError
from rich.console import Console

from common.errors import JobFileError, LorafleetError
from common.manifest import JobStatus
from common.settings import get_settings

EXIT_FAILED_JOBS = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
# What the `worker` extra brings: commands that render need it, `submit` does not.
WORKER_EXTRA = {
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "safetensors",
    "imageio",
    "imageio_ffmpeg",
    "sentencepiece",
    "PIL",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description="Render CogVideoX + LoRA videos on a GPU fleet.")
    parser.add_argument("--redis-url", help="broker and results (LORAFLEET_REDIS_URL)")
    parser.add_argument("--store-url", help="the shared store (LORAFLEET_STORE_URL; default ./results)")
    parser.add_argument("--default-model", help="the fleet's default model folder or hub id (LORAFLEET_MODEL)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="validate a .jsonl of jobs and enqueue them")
    submit.add_argument("file")
    submit.add_argument("--wait", action="store_true", help="show progress until every job ends")
    submit.add_argument("--batch", help="batch name (default: the time and a random suffix)")

    device = argparse.ArgumentParser(add_help=False)
    where = device.add_mutually_exclusive_group()
    where.add_argument("--gpu", type=int, help="pin to this GPU (sets CUDA_VISIBLE_DEVICES before torch starts)")
    where.add_argument("--device", choices=["cpu", "cuda"], help="run on the CPU, or on the first visible GPU")
    device.add_argument("--model", help="serve this model alias (LORAFLEET_MODELS) instead of the default model")
    device.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the transformer (LORAFLEET_COMPILE)"
    )

    commands.add_parser("worker", parents=[device], help="one Celery worker pinned to one device")
    workers = commands.add_parser("workers", help="one supervised worker per GPU")
    workers.add_argument("--gpus", default="all", help='"all" or a list such as 0,2')
    workers.add_argument("--model", help="serve this model alias (LORAFLEET_MODELS)")
    workers.add_argument("--compile", action="store_true", default=None, help="torch.compile each worker's transformer")

    render = commands.add_parser("render", parents=[device], help="render a .jsonl in this process, no Redis")
    render.add_argument("file")
    render.add_argument("--out", help="store to write into (LORAFLEET_STORE_URL)")
    render.add_argument("--batch", help="batch name for the manifest")

    tiny = commands.add_parser("tiny-model", help="build the tiny random-weight pipeline and two adapters")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)

    sweep = commands.add_parser("sweep", help="run a sweep spec (YAML or JSON) as one batch and write its report")
    sweep.add_argument("file")
    sweep.add_argument("--batch", help="batch name (default: the spec's name and today's date)")
    sweep.add_argument("--compare", metavar="BATCH", help="mark the cells whose numbers moved since that sweep")

    for name, text in (
        ("status", "counts by state, and each failure's reason; brings the manifest up to date"),
        ("cancel", "queued jobs never start; running ones stop at their next denoising step"),
        ("retry", "enqueue the batch's failed and cancelled jobs again"),
    ):
        control = commands.add_parser(name, help=text)
        control.add_argument("batch")
        if name == "retry":
            control.add_argument("--wait", action="store_true", help="show progress until every job ends")

    commands.add_parser("demo", help="tiny model, private Redis, one CPU worker, submit examples/prompts.jsonl --wait")
    return parser


def _apply_flags(args: argparse.Namespace) -> None:
    """Write the flags that map onto settings into the environment, before settings are read."""
    for flag, env in (
        ("redis_url", "REDIS_URL"),
        ("store_url", "STORE_URL"),
        ("default_model", "MODEL"),
        ("out", "STORE_URL"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[f"LORAFLEET_{env}"] = value
    if getattr(args, "compile", None):
        os.environ["LORAFLEET_COMPILE"] = "true"  # `workers` passes it on to each worker this way
    get_settings.cache_clear()


def _pick_device(args: argparse.Namespace) -> tuple[str, int | None]:
    """The torch device and GPU index for a worker; pins the GPU before torch is imported."""
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        return "cuda:0", args.gpu
    if args.device == "cpu":
        return "cpu", None
    import torch

    if torch.cuda.is_available():
        return "cuda:0", 0
    if args.device == "cuda":
        raise LorafleetError("--device cuda: no GPU is visible to torch here")
    logging.getLogger("lorafleet").warning("no GPU visible: running on the CPU (say --device cpu to silence this)")
    return "cpu", None


def main(argv: list[str] | None = None) -> int:
    """Run one lorafleet command; returns its exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _apply_flags(args)
    console = Console(stderr=False)
    try:
        return _run(args, console)
    except JobFileError as exc:
        print(exc, file=sys.stderr)  # plain lines, never wrapped: one error a line, easy to grep
        return EXIT_BAD_INPUT
    except LorafleetError as exc:
        print(f"lorafleet {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in WORKER_EXTRA:
            print(f"lorafleet {args.command}: needs {exc.name}: pip install 'lorafleet[worker]'", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    except (RedisError, OperationalError) as exc:
        url = re.sub(r"://([^@/]*):[^@/]*@", r"://\1:***@", get_settings().redis_url)  # never print a password
        print(f"lorafleet {args.command}: cannot use Redis at {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, console: Console) -> int:
    settings = get_settings()
    if args.command == "submit":
        from producer.follow import wait_for_batch
        from producer.submit import submit

        batch = submit(args.file, settings, args.batch)
        queued, done = batch.enqueued, batch.count(JobStatus.DONE)
        console.print(f"batch {batch.name}: {len(batch.entries)} jobs, {queued} enqueued, {done} already in the store")
        if args.wait:
            return 0 if wait_for_batch(batch, settings, console) else EXIT_FAILED_JOBS
        return 0
    if args.command == "sweep":
        from producer.sweep import run_sweep

        return 0 if run_sweep(args.file, settings, console, args.batch, args.compare) else EXIT_FAILED_JOBS
    if args.command in ("status", "cancel", "retry"):
        from producer.control import cancel, retry
        from producer.follow import status, wait_for_batch

        if args.command == "status":
            batch = status(settings, args.batch, console)
            return EXIT_FAILED_JOBS if batch.count(JobStatus.FAILED) else 0
        if args.command == "cancel":
            cancel(settings, args.batch, console)
            return 0
        batch = retry(settings, args.batch, console)
        if args.wait:
            return 0 if wait_for_batch(batch, settings, console) else EXIT_FAILED_JOBS
        return 0
    if args.command == "worker":
        device, gpu = _pick_device(args)
        from workers.worker import run_worker, worker_name

        return run_worker(settings, device, worker_name(gpu), args.model)
    if args.command == "workers":
        from workers.supervisor import list_gpus, run_workers

        return run_workers(list_gpus(args.gpus), ["--model", args.model] if args.model else [])
    if args.command == "render":
        device, _ = _pick_device(args)
        if args.model:
            os.environ["LORAFLEET_MODEL"] = settings.model_ref(args.model)
            get_settings.cache_clear()
            settings = get_settings()
        from lorafleet.local_render import render_file

        batch = render_file(args.file, settings, device, console, args.batch)
        return 0 if batch.count(JobStatus.FAILED) == 0 else EXIT_FAILED_JOBS
    if args.command == "tiny-model":
        from workers.tiny_model import write_tiny_model

        for name, path in write_tiny_model(args.dir, args.seed).items():
            console.print(f"{name}: {path}")
        return 0
    if args.command == "demo":
        from lorafleet.demo import run_demo

        return run_demo(console)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
