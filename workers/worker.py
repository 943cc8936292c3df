"""One Celery worker on one device: load the model once, say READY, then serve the model's queue.

The device is pinned by the caller (the `lorafleet worker` command sets CUDA_VISIBLE_DEVICES
before torch is imported), so a worker only ever sees its own GPU as cuda:0.
"""

import gc
import logging
import os
import signal
import socket
import sys
import threading
import time

from celery import signals as celery_signals

from common.broker import make_app
from common.bulk import paused_gc
from common.errors import ExitCode, LorafleetError
from common.leases import Ledger, run_cancel_listener, run_heartbeat, run_sweeper
from common.logs import set_process_fields
from common.model import model_info
from common.settings import Settings, queue_for
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


class Worker:
    """One worker's life, start to stop: its probes (first, so they answer while it starts), its
    model, its Celery app and tasks, the threads that keep its duties to the fleet (the lease
    sweeper, the cancel listener, the heartbeat once READY), and its shutdown (the last upload
    first, then the threads, then its heartbeat). `lorafleet worker` makes one and runs it."""

    def __init__(self, settings: Settings, device: str, name: str, alias: str | None):
        self.settings, self.device, self.name, self.alias = settings, device, name, alias
        self.queue = queue_for(alias)
        self.health = Health()
        self.stop = threading.Event()  # every background thread of this worker ends when it is set

    def run(self) -> int:
        """Serve jobs until told to stop; returns the process exit code."""
        set_process_fields(worker=self.name)
        if self.settings.metrics_port is not None:  # first: probes get "starting" while the model loads
            serve(self.settings.metrics_host, self.settings.metrics_port, self.health)
        try:
            self.load()
        except LorafleetError as exc:
            log.error("%s: cannot start: %s", self.name, exc)
            return ExitCode.MODEL_LOAD_FAILED
        except Exception:
            log.exception("%s: cannot start: the model failed to load", self.name)
            return ExitCode.MODEL_LOAD_FAILED
        self.start_fleet_duties()
        code = self.consume()
        self.shut_down()
        return code

    def load(self) -> None:
        """Check the model (a wrong path or alias says so before torch's seconds of imports), import
        what a worker runs while its weights are read ahead, and load the model into a Renderer."""
        self.tier = tier = self.settings.model_tier(self.alias)
        model_info(tier.ref)
        if tier.precision != "fp8":
            keep_torchao_out()
        if self.settings.prefetch_weights:
            prefetch_weights(tier.ref)
        log.info("%s: starting on %s (importing torch and diffusers)", self.name, self.device)
        # The imports make a few million objects that live as long as the worker, and the cyclic
        # collector would scan them again and again while they are made (a sixth of the imports'
        # time): off while importing, then they are frozen out of every later collection's scan.
        with paused_gc():
            from workers.metrics import INFO, RENDERER
            from workers.renderer import Renderer, versions

            gc.freeze()

        quiet_per_job_noise(self.settings.log_format == "json")
        log.info("%s: %.1fs after start, imports done; loading %s", self.name, seconds_since_start(), tier.ref)
        self.renderer = renderer = Renderer(
            tier.ref, self.device, self.settings, self.name, tier.precision, tier.compile, tier.attention, tier.cache
        )
        RENDERER.renderer = renderer
        self.health.about = {
            "device": renderer.device_name(),
            "model": self.alias or tier.ref,
            "tier": ("fp8" if renderer.precision == "fp8" else str(renderer.dtype).removeprefix("torch."))
            + (", compiled" if renderer.compiled else "")
            + (f", {renderer.attention}" if renderer.attention != "sdpa" else "")
            + (f", draft ({tier.cache.hook})" if tier.cache else ""),
        }
        INFO.info(
            {"worker": self.name, "model": tier.ref, "device": renderer.device_name(), "dtype": str(renderer.dtype)}
            | {f"{package}_version": version for package, version in versions().items()}
        )

    def start_fleet_duties(self) -> None:
        """The Celery app and its tasks on the renderer's store, and the threads every worker runs
        for the fleet: the sweeper (dead workers' jobs enqueued again) and the cancel listener; the
        heartbeat starts once Celery consumes (`on_ready`)."""
        from workers.evaluator import Evaluator
        from workers.tasks import EvaluateTask, RenderTask, requeue

        settings, name = self.settings, self.name
        self.app = app = make_app(settings)
        self.ledger = ledger = Ledger.from_settings(settings)
        answer_revoke_as_cancel(ledger)
        store = self.renderer.store  # the one store of this worker: adapters, images, outputs
        self.render_task = RenderTask(self.renderer, store, ledger, settings, self.queue, self.health)
        app.register_task(self.render_task)
        app.register_task(EvaluateTask(Evaluator(settings, self.device), store, settings, name))
        self.thread(
            run_sweeper,
            ledger,
            lambda task_id, entry: requeue(app, task_id, entry),
            self.stop,
            name,
            # A worker without its sweeper would serve on while dead workers' jobs wait for hours: stop it.
            on_death=lambda: os.kill(os.getpid(), signal.SIGTERM),
        )
        self.thread(run_cancel_listener, ledger, self.stop, name)
        celery_signals.worker_ready.connect(self.on_ready, weak=False)
        log.info("%s: model loaded in %.1fs; connecting to the broker", name, self.renderer.load_seconds)

    def thread(self, target, *args, **kwargs) -> None:
        """A daemon thread of this worker's, named after what it runs."""
        threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True, name=target.__name__).start()

    def on_ready(self, **_) -> None:
        """Celery consumes from the broker: only now is this worker READY, and it starts beating."""
        escalate_sigterm(self.name, self.settings.shutdown_timeout_s)
        self.health.ready = True
        self.thread(run_heartbeat, self.ledger, self.name, self.queue, self.stop, self.health)
        log.info(
            "%s: READY %.1fs after start: %s (%s) loaded in %.1fs, broker connected, serving queue %s",
            self.name, seconds_since_start(), self.tier.ref, self.health.about["tier"], self.renderer.load_seconds,
            self.queue,
        )  # fmt: skip

    def consume(self) -> int:
        """Run Celery's consumer until a warm shutdown; returns its exit code."""
        try:
            self.app.worker_main(
                [
                    *(["--quiet"] if self.settings.log_format == "json" else []),  # no banner: one JSON object a line
                    "worker",
                    # One job at a time in a thread of this process: never a fork after CUDA starts,
                    # and the consumer's own loop stays free to send heartbeats and events and to
                    # answer `celery inspect` while a job renders (the solo pool runs the job inside
                    # that loop: Flower showed every rendering worker offline).
                    "--pool=threads",
                    "--concurrency=1",
                    f"--hostname={self.name}",
                    f"--queues={self.queue}",
                    "--loglevel=INFO",
                    "--without-mingle",
                ]
            )
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 0
        return 0

    def shut_down(self) -> None:
        """The last job's video into the store before its lease goes, then the threads, then the
        heartbeat's record, and a one-line tally."""
        self.render_task.uploads.wait()
        self.stop.set()
        self.health.wake.set()  # the heartbeat, waiting for its next beat, sees the stop now
        self.ledger.forget_worker(self.name)
        log.info(
            "%s: stopped after %d render(s); %s", self.name, self.renderer.rendered, self.renderer.cache_stats().as_dict()
        )


if __name__ == "__main__":  # pragma: no cover - started through `lorafleet worker`
    sys.exit("start a worker with: lorafleet worker --gpu N | --device cpu")
