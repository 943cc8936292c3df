"""The records lorafleet keeps in Redis beside Celery's, each read through its model: whoever can
write to Redis can write one, so a malformed one is skipped (and logged once), never trusted."""

import logging
from enum import IntEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("lorafleet.ledger")


class Admission(IntEnum):
    """What `Ledger.admit` found of a job about to start (the values its script returns)."""

    GO = 0
    SET_ASIDE = 1  # its batch is paused: set aside, to be sent again on resume
    BATCH_CANCELLED = 2
    JOB_CANCELLED = 3


class Record(BaseModel):
    """A record lorafleet keeps in Redis as JSON. Whoever can write to Redis can write one, so each
    is read through its model: a malformed one is skipped (and logged once), never trusted. Every
    number in one is finite and in its range (a NaN time or a pace of 0 pixels is malformed)."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


Seconds = Annotated[float, Field(ge=0)]  # a duration, or a Unix time


class RunningJob(Record):
    """What a worker's heartbeat says it runs: the job, since when, and how far its denoising got."""

    key: str
    since: Seconds
    task_id: str | None = None
    batch: str | None = None
    step: Annotated[int, Field(ge=0)] | None = None
    steps: Annotated[int, Field(ge=1)] | None = None
    step_s: Seconds | None = None  # seconds per denoising step so far


class Pace(Record):
    """How long a worker's last job held its GPU, for estimates (`lorafleet sweep --estimate`): its
    size in pixels (frames × height × width), its seconds per denoising step, and the rest of its
    render (the prompt, the variant, the decode) in seconds. The upload runs beside the next job."""

    pixels: Annotated[int, Field(gt=0)]
    step_s: Seconds
    other_s: Seconds


class WorkerRecord(Record):
    """A worker's heartbeat: `lorafleet:worker:<name>`."""

    worker: str
    queue: str
    since: Seconds
    beat: Seconds
    job: RunningJob | None = None
    device: str | None = None  # "NVIDIA H200", "cpu"
    model: str | None = None  # the model it serves (alias or reference)
    tier: str | None = None  # "bf16", "fp8, compiled"
    pace: Pace | None = None  # its last job's, once it finished one


class CancelNotice(Record):
    """What `lorafleet cancel` publishes on CANCELS: a batch, or only these jobs (task ids) of it
    (of whatever batch, when a revoke names them)."""

    batch: str | None = None
    tasks: list[str] = []


class RunningEntry(Record):
    """A running job's entry in `lorafleet:running`: what to enqueue again if its lease lapses."""

    message: dict
    queue: str
    worker: str


class SetAside(Record):
    """A paused batch's job that a worker set aside (`lorafleet:set-aside:<batch>`): sent again,
    under its task id and to its queue, on resume."""

    task_id: str
    message: dict
    queue: str


_reported: set[str] = set()  # the malformed records already logged, once each per process


def parse_record(model: type[Record], name: str, raw) -> Record | None:
    """A Redis record read through its model, or None (logged once) if it is malformed."""
    try:
        return model.model_validate_json(raw)
    except (ValidationError, ValueError, TypeError) as exc:
        if name not in _reported:
            _reported.add(name)
            log.warning("skipped a malformed %s record %s: %s", model.__name__, name[:120], str(exc).splitlines()[0])
        return None
