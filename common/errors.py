"""lorafleet's errors: one base, and a subclass for each kind of failure a user can act on; and
the exit codes every lorafleet process ends with (docs/reference/generated/exit-codes.md is generated from it)."""

from enum import IntEnum


class ExitCode(IntEnum):
    """How a lorafleet command or worker process ends."""

    OK = 0  # done: every job rendered, or the worker stopped when asked
    JOBS_FAILED = 1  # the command ran, and some jobs failed or were cancelled
    UNHEALTHY = 1  # `lorafleet health`: no fresh heartbeat from the worker (an alias of 1)
    BAD_INPUT = 2  # a bad file, flag or batch name: nothing was enqueued
    REDIS_UNREACHABLE = 3  # Redis refused us (down, wrong password, TLS)
    HANDED_BACK = 4  # a worker stopped mid-job (a second SIGTERM or the shutdown timeout): it runs again elsewhere
    MODEL_LOAD_FAILED = 5  # a worker could not load its model
    FAILED = 6  # something else went wrong, said in one line
    TIMEOUT = 7  # --timeout passed before every job ended: the jobs stay queued
    INTERRUPTED = 130  # Ctrl-C


class LorafleetError(Exception):
    """Raised for any failure lorafleet can explain in one line; its message is that line."""

    exit_code = ExitCode.FAILED  # what a command that ends on it exits with


class InputError(LorafleetError):
    """Raised when what a user gave (a file, a name, a setting) is wrong: nothing was done with it."""

    exit_code = ExitCode.BAD_INPUT


class JobError(InputError):
    """Raised when a job is malformed: the message names the line (or job) and the field."""


class JobFileError(InputError):
    """Raised when a jobs file has errors; holds every line's error so all are shown at once."""

    def __init__(self, path: str, errors: list[str]):
        self.path = path
        self.errors = errors
        shown = "\n".join(errors[:50])
        more = f"\n... and {len(errors) - 50} more" if len(errors) > 50 else ""
        super().__init__(f"{path}: {len(errors)} error(s), nothing was enqueued\n{shown}{more}")


class AdapterError(InputError):
    """Raised when an adapter cannot be found, read, or applied to the model."""


class ImageError(AdapterError):
    """Raised when a job's image cannot be found, read or decoded, or lies outside the allowed
    locations (it is read under the adapters' policy, so it is handled wherever they are)."""


class ModelError(InputError):
    """Raised when the model cannot be found or its configuration cannot be read."""


class StoreError(LorafleetError):
    """Raised when the shared store cannot be read or written."""


class JobCancelled(LorafleetError):
    """Raised when a job's batch was cancelled before or while it rendered."""


class WorkerLost(LorafleetError):
    """Raised when a job's workers died on it `max_deliveries` times in a row: it is not delivered again."""


class LeaseLost(LorafleetError):
    """Raised when a worker learns that another delivery took its job over (it paused or lost Redis
    past its lease): it stops without writing, and the other delivery's result stands."""


class StoreLockLost(LorafleetError):
    """Raised when a prune or a submit finds that its hold on the store lock lapsed (it paused past
    the lock's time to live): it stops before its next write."""


class RenderError(LorafleetError):
    """Raised when a render produced something that must not be stored (NaN or infinite values)."""


class MemoryBudgetError(LorafleetError):
    """Raised when a render cannot fit its worker's GPU memory budget (LORAFLEET_GPU_MEMORY_GB): at
    start for the model's default size, or before rendering a job of a larger size."""


class SendConflict(LorafleetError):
    """Raised when another process sent some of a batch's unsent jobs while this one was sending
    them (common/broker.py: SendFence): this one stops, and no job is sent twice."""


class SendInterrupted(LorafleetError):
    """Raised when a submit (or retry) stops while it sends a batch's jobs (Ctrl-C, Redis gone): the
    batch records what went, and `lorafleet retry BATCH` sends the rest."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WaitTimeout(LorafleetError):
    """Raised when a waiting command's --timeout passes before every job ended; the jobs stay queued."""

    exit_code = ExitCode.TIMEOUT


class EvaluationError(LorafleetError):
    """A key cannot be evaluated: no video or metadata in the store, or the CLIP model does not load."""


def quoted(value, limit: int = 80) -> str:
    """A value as an error message shows it: JSON, cut to `limit` characters ("…" where cut), so
    that an error never echoes a huge input whole."""
    import json

    shown = json.dumps(value, default=str, ensure_ascii=False)
    return shown if len(shown) <= limit else shown[:limit] + "…"
