"""One Celery worker on one device: load the model once, say READY, then serve the model's queue.

The device is pinned by the caller (the `lorafleet worker` command sets CUDA_VISIBLE_DEVICES
before torch is imported), so a worker only ever sees its own GPU as cuda:0.
"""

import logging
import os
import signal
import socket
import sys
import threading
import time

from celery import signals as celery_signals

from common.broker import make_app
from common.errors import ExitCode, LorafleetError
from common.leases import Ledger, run_cancel_listener, run_heartbeat, run_sweeper
from common.logs import set_process_fields
from common.model import model_info
from common.settings import Settings, queue_for
from common.store import Store
from workers.metrics import Health, serve
from workers.remote_control import answer_revoke_as_cancel

log = logging.getLogger("lorafleet.worker")


def worker_name(gpu: int | None) -> str:
    """`gpuN@host`, or `cpu-PID@host` for a CPU worker (several can share a host): every log line
    and result carries it."""
    return f"{f'cpu-{os.getpid()}' if gpu is None else f'gpu{gpu}'}@{socket.gethostname()}"


def escalate_sigterm(name: str, timeout_s: float) -> None:
    """On top of Celery's warm shutdown (the first SIGTERM: stop taking jobs, finish the running
    one): exit at once on a second SIGTERM, or when the running job outlasts `timeout_s`. Either
    way the job's lease lapses and another worker renders it; its late duplicate finds the video."""
    celery_handler = signal.getsignal(signal.SIGTERM)
    received = []

    def hand_back(why: str) -> None:
        log.warning("%s: %s: exiting now; the running job, if any, is delivered again", name, why)
        logging.shutdown()
        os._exit(ExitCode.HANDED_BACK)

    def on_sigterm(signum, frame):
        received.append(signum)
        if len(received) > 1:
            hand_back("second SIGTERM")
        timer = threading.Timer(timeout_s, hand_back, args=(f"still busy {timeout_s:.0f}s after SIGTERM",))
        timer.daemon = True
        timer.start()
        if callable(celery_handler):
            celery_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


class OncePerMessage(logging.Filter):
    """Let a log message through once per process: diffusers warns of a truncated prompt on every
    job, and a fleet's sweep repeats its prompts."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_per_job_noise(json_logs: bool = False) -> None:
    """One line per job is lorafleet's own; Celery's result dicts and repeated library warnings go.
    With JSON logs, the libraries' progress bars go too: every line of the log is one object."""
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)  # "succeeded in 1.2s: {…whole result…}"
    for pipeline in ("cogvideox", "cogvideox_image2video"):
        logging.getLogger(f"diffusers.pipelines.cogvideo.pipeline_{pipeline}").addFilter(OncePerMessage())
    if json_logs:
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components..."
        transformers.utils.logging.disable_progress_bar()


def keep_torchao_out() -> None:
    """diffusers and peft import torchao whenever it is installed (for quantizers lorafleet does not
    use), and on a machine without its kernels torchao greets the log with "Failed to load"
    warnings. Only the fp8 tier uses it (workers/fp8.py): a worker of another tier marks it absent
    before they import, and their availability checks (`importlib.util.find_spec`) then say no."""
    sys.modules.setdefault("torchao", None)


def seconds_since_start() -> float:
    """How long ago this process started (Linux: from /proc, interpreter start-up included), or
    since this module was imported where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rpartition(")")[2].split()  # the name may hold spaces and parentheses
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in ticks since boot
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
WEIGHT_FILES = (".safetensors", ".bin")


def prefetch_weights(model_ref: str) -> None:
    """Read a local model folder's weight files in a background thread, into the page cache, while
    this worker imports torch and diffusers (seconds of CPU with the disk idle): loading the model
    then reads memory, not the disk. A hub id, or a folder on a host with too little memory to keep
    it, gains nothing and loses nothing."""
    if not os.path.isdir(model_ref):
        return

    def read_all() -> None:
        buffer = bytearray(8 * 2**20)
        for folder, _, names in os.walk(model_ref):
            for name in sorted(n for n in names if n.endswith(WEIGHT_FILES)):
                try:
                    with open(os.path.join(folder, name), "rb", buffering=0) as f:
                        while f.readinto(buffer):  # releases the GIL while the disk reads
                            pass
                except OSError:
                    return  # from_pretrained says what is wrong, in its own words

    threading.Thread(target=read_all, daemon=True, name="prefetch").start()


def run_worker(settings: Settings, device: str, name: str, alias: str | None) -> int:
    """Serve jobs until told to stop; returns the process exit code."""
    set_process_fields(worker=name)
    health = Health()
    if settings.metrics_port is not None:  # first: probes get "starting" while the model loads
        serve(settings.metrics_host, settings.metrics_port, health)
    try:  # a wrong model path or alias says so now, not after torch's seconds of imports
        tier = settings.model_tier(alias)
        model_info(tier.ref)
    except LorafleetError as exc:
        log.error("%s: cannot start: %s", name, exc)
        return ExitCode.MODEL_LOAD_FAILED
    if tier.precision != "fp8":
        keep_torchao_out()
    if settings.prefetch_weights:
        prefetch_weights(tier.ref)
    log.info("%s: starting on %s (importing torch and diffusers)", name, device)
    from workers.evaluator import Evaluator
    from workers.metrics import INFO, RENDERER
    from workers.renderer import Renderer, versions
    from workers.tasks import EvaluateTask, RenderTask, requeue

    quiet_per_job_noise(settings.log_format == "json")
    queue = queue_for(alias)
    try:
        model_ref = tier.ref
        log.info("%s: %.1fs after start, imports done; loading %s", name, seconds_since_start(), model_ref)
        renderer = Renderer(model_ref, device, settings, name, tier.precision, tier.compile, tier.attention, tier.cache)
    except LorafleetError as exc:
        log.error("%s: cannot start: %s", name, exc)
        return ExitCode.MODEL_LOAD_FAILED
    except Exception:
        log.exception("%s: cannot start: the model failed to load", name)
        return ExitCode.MODEL_LOAD_FAILED
    app = make_app(settings)
    ledger = Ledger.from_settings(settings)
    RENDERER.renderer = renderer
    health.about = {
        "device": renderer.device_name(),
        "model": alias or model_ref,
        "tier": ("fp8" if renderer.precision == "fp8" else str(renderer.dtype).removeprefix("torch."))
        + (", compiled" if renderer.compiled else "")
        + (f", {renderer.attention}" if renderer.attention != "sdpa" else "")
        + (f", draft ({tier.cache.hook})" if tier.cache else ""),
    }
    INFO.info(
        {"worker": name, "model": model_ref, "device": renderer.device_name(), "dtype": str(renderer.dtype)}
        | {f"{package}_version": version for package, version in versions().items()}
    )
    answer_revoke_as_cancel(ledger)
    store = Store(settings.store_url)
    render_task = RenderTask(renderer, store, ledger, settings, queue, health)
    app.register_task(render_task)
    app.register_task(EvaluateTask(Evaluator(settings, device), store, settings, name))
    stop = threading.Event()
    sweeper = threading.Thread(
        target=run_sweeper,
        # A worker without its sweeper would serve on while dead workers' jobs wait for hours: stop it.
        args=(ledger, lambda task_id, entry: requeue(app, task_id, entry), stop, name),
        kwargs={"on_death": lambda: os.kill(os.getpid(), signal.SIGTERM)},
        daemon=True,
        name="sweeper",
    )
    sweeper.start()
    threading.Thread(target=run_cancel_listener, args=(ledger, stop, name), daemon=True, name="cancels").start()

    def on_ready(**_):
        # Celery says ready once it consumes from the broker: only now is this worker READY.
        escalate_sigterm(name, settings.shutdown_timeout_s)
        health.ready = True
        threading.Thread(
            target=run_heartbeat, args=(ledger, name, queue, stop, health), daemon=True, name="heartbeat"
        ).start()
        log.info(
            "%s: READY %.1fs after start: %s (%s) loaded in %.1fs, broker connected, serving queue %s",
            name,
            seconds_since_start(),
            model_ref,
            health.about["tier"],
            renderer.load_seconds,
            queue,
        )

    celery_signals.worker_ready.connect(on_ready, weak=False)
    log.info("%s: model loaded in %.1fs; connecting to the broker", name, renderer.load_seconds)
    try:
        app.worker_main(
            [
                *(["--quiet"] if settings.log_format == "json" else []),  # no banner: every line is one JSON object
                "worker",
                # One job at a time in a thread of this process: never a fork after CUDA starts,
                # and the consumer's own loop stays free to send heartbeats and events and to
                # answer `celery inspect` while a job renders (the solo pool runs the job inside
                # that loop: Flower showed every rendering worker offline).
                "--pool=threads",
                "--concurrency=1",
                f"--hostname={name}",
                f"--queues={queue}",
                "--loglevel=INFO",
                "--without-mingle",
            ]
        )
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    else:
        code = 0
    render_task.uploads.wait()  # the last job's video into the store before its lease goes
    stop.set()
    health.wake.set()  # the heartbeat, waiting for its next beat, sees the stop now
    ledger.forget_worker(name)
    log.info("%s: stopped after %d render(s); %s", name, renderer.rendered, renderer.cache_stats())
    return code


if __name__ == "__main__":  # pragma: no cover - started through `lorafleet worker`
    sys.exit("start a worker with: lorafleet worker --gpu N | --device cpu")
