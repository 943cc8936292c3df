"""lorafleet's wire protocol in one place, as rq keeps its keys in `rq/keys.py`: the name of every
Redis key lorafleet writes beside Celery's, the states a job's task passes through, and the shapes
of what a worker reports (its progress and its result). Nothing else builds a key name.

Anyone who can write to Redis can write these; readers parse them through their models
(common/leases/records.py: `parse_record`) and never trust them further.
"""

import re
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

TASK_NAME = "lorafleet.render"  # one positional argument: the job as a JSON object (docs/design.md)
EVAL_TASK_NAME = "lorafleet.evaluate"  # one positional argument: {"key": KEY}
PREFIX = "lorafleet"
# A batch name is one plain folder name in the store and part of Redis key names, safe in a
# terminal and a URL: letters, digits, ".", "_" and "-", at most 128.
BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BATCH_NAME_RULE = 'must be 1 to 128 letters, digits, ".", "_" or "-", starting with a letter or digit'


def lease_key(task_id: str) -> str:
    """A running delivery's lease (its token, with a time to live its worker keeps extending)."""
    return f"{PREFIX}:lease:{task_id}"


RUNNING = f"{PREFIX}:running"  # hash: task id -> RunningEntry, what to enqueue again if its lease lapses


def deliveries_key(task_id: str) -> str:
    """How many deliveries of a task in a row did not end cleanly."""
    return f"{PREFIX}:deliveries:{task_id}"


def lock_key(job_key: str) -> str:
    """The fleet-wide render lock of a job key (the holder's lease token)."""
    return f"{PREFIX}:lock:{job_key}"


WORKER_PREFIX = f"{PREFIX}:worker:"  # + a worker's name: its heartbeat (WorkerRecord)


def worker_key(worker: str) -> str:
    """A worker's heartbeat record."""
    return WORKER_PREFIX + worker


def cancelled_key(batch: str) -> str:
    """Set while a batch is cancelled."""
    return f"{PREFIX}:cancelled:{batch}"


def cancelled_task_key(task_id: str) -> str:
    """Set while one job (task) is cancelled."""
    return f"{PREFIX}:cancelled-task:{task_id}"


PRUNING = f"{PREFIX}:store-lock:prune"  # the token of the prune that holds the store lock (common/store_lock.py)
SUBMITTING = f"{PREFIX}:store-lock:submits"  # sorted set: token -> expiry (ms) of each submit inside the lock
CANCELS = f"{PREFIX}:cancels"  # pub/sub channel: a CancelNotice each time a batch or some of its jobs are cancelled

PAUSED_PREFIX = f"{PREFIX}:paused:"  # + a batch's name: set while it is paused


def paused_key(batch: str) -> str:
    """Set while a batch is paused."""
    return PAUSED_PREFIX + batch


def set_aside_key(batch: str) -> str:
    """List of a paused batch's jobs that workers set aside, sent again on resume."""
    return f"{PREFIX}:set-aside:{batch}"


def sent_key(batch: str) -> str:
    """How many of a batch's unsent tasks its submit has sent (in manifest order), moved on with
    each chunk of messages in the same step (common/broker.py: SendFence)."""
    return f"{PREFIX}:sent:{batch}"


def batch_keys(batch: str) -> list[str]:
    """Everything Redis keeps of a batch by name (cancel and pause flags, jobs set aside, what its
    submit sent)."""
    return [cancelled_key(batch), paused_key(batch), set_aside_key(batch), sent_key(batch)]


# A job's priority as kombu's Redis transport takes it: one Redis list per step, and a worker
# takes from the lowest step that holds a job (0 first). A message sent without a priority is 0.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITIES = {"high": 0, "normal": 3, "low": 6}  # submit's default: normal; a sweep's: low
PRIORITY_SEPARATOR = "\x06\x16"  # kombu's, between a queue's name and its step


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's jobs, the ones served first first (`render`, then
    `render\\x06\\x163`, ...): what a queue's length and KEDA's triggers count."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


class TaskState(StrEnum):
    """The states of a `lorafleet.render` task in Celery's result backend: Celery's own, and
    PAUSED, which lorafleet adds once a job is set aside. A running job stays STARTED: its progress
    is in its worker's heartbeat (common/leases/records.py: WorkerRecord), not rewritten here at each step."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    PROGRESS = "PROGRESS"  # written by workers before 2026-12-03 while they denoised: read as running
    PAUSED = "PAUSED"  # set aside while its batch is paused; `lorafleet resume` sends it again
    SUCCESS = "SUCCESS"  # its result is a RenderResult
    FAILURE = "FAILURE"  # its result is the exception
    REVOKED = "REVOKED"  # revoked through Celery (Flower, `celery control revoke`) before it started
    RETRY = "RETRY"


ENDED = (TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED)
RUNNING_STATES = (TaskState.STARTED, TaskState.PROGRESS)


class Report(BaseModel):
    """A report a worker writes for others to read."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


class ProgressReport(Report):
    """A running job's denoising progress, as `wait` shows it (from its worker's heartbeat)."""

    key: str
    step: int
    steps: int
    worker: str


class PausedReport(Report):
    """A job set aside while its batch is paused (the PAUSED state's result)."""

    key: str
    batch: str | None = None


class RenderResult(Report):
    """What a finished `lorafleet.render` task returns: its outputs, or that they already were there."""

    key: str
    worker: str
    status: str  # "done": rendered now; "exists": already in the store
    video: str
    poster: str
    metadata: str
    seconds: Annotated[float, Field(ge=0)] | None = None  # the job's own time on its worker: what ETAs are made of
