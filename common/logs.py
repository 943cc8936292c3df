"""How every lorafleet process logs: a plain line a record for a terminal, or one JSON object a
line (LORAFLEET_LOG_FORMAT=json) that a cluster's log pipeline reads as fields: time, level,
logger, message, and, where there are ones, the worker, the job's key and its batch.

The worker's name is the process's (`set_process_fields`); a job's key and batch belong to the
thread rendering it (`job_fields`, a context variable: a worker's upload thread is handed its
job's context), so two jobs in flight on one worker, the render and the upload, never mix them up.
"""

import contextvars
import datetime
import json
import logging
from contextlib import contextmanager

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_process: dict[str, str] = {}  # fields of every record of this process: {"worker": "gpu0@host"}
_job: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lorafleet_job", default=None)


def set_process_fields(**fields: str) -> None:
    """Fields every record of this process carries from now on (the worker's name)."""
    _process.update(fields)


@contextmanager
def job_fields(**fields):
    """The records logged in this block (in this thread or context) carry these fields (key, batch)."""
    token = _job.set({**(_job.get() or {}), **{name: value for name, value in fields.items() if value is not None}})
    try:
        yield
    finally:
        _job.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, the process's and the
    job's fields, and a traceback where there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_process,
            **(_job.get() or {}),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: str, level: str) -> None:
    """Log every record of this process at `level` and above to stderr, in `log_format` ("text" or
    "json"). In json, Python's warnings are records too, so that every line is one object."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(log_format == "json")
