"""What makes delivery at-least-once and rendering at-most-once, kept in Redis next to the queue.

- Leases: a running job holds a lease that its worker refreshes every `lease_s / 3`. A worker that
  dies (SIGKILL, OOM killer, power) stops refreshing; the sweeper in every live worker finds the
  lapsed lease and enqueues the job again within about `lease_s`, instead of waiting for Redis'
  visibility timeout (hours, since it must exceed the longest render).
- Delivery count: consecutive deliveries that did not end cleanly. A job that kills its worker
  `max_deliveries` times is failed with that reason instead of being delivered again.
- Key locks: one render per key at a time, fleet-wide; a second worker with the same key waits
  for the first one's video, or takes over if the first one's lock lapses.
- Fencing: a delivery's lease and key lock hold a random token. The heartbeat extends them only
  while they still hold it (compare and extend, in one step), so a worker that paused past its
  lease (SIGSTOP, a long GC, a frozen VM) learns that another delivery took its job over, stops at
  its next denoising step, and proves it still holds the token before any write to the store.
- Cancel flags per batch and per job: a job is admitted only if neither is set (one script, with
  the pause check). A running one is told at once by a notice on a pub/sub channel that every
  worker listens to, and, should a notice be missed (a dropped connection), finds the flag at its
  lease's next extension, which reads them: stopping costs no Redis command per denoising step.
- Worker heartbeats: each consuming worker refreshes a key naming it and its queue every
  HEARTBEAT_S, so a waiting command can tell a queue nobody serves from a busy one.
"""

from common.leases.book import Book
from common.leases.cancels import Cancels
from common.leases.deliveries import Deliveries, Lease
from common.leases.heartbeats import HEARTBEAT_S, Heartbeats
from common.leases.loops import run_cancel_listener, run_heartbeat, run_sweeper
from common.leases.pauses import Pauses
from common.leases.records import (
    Admission,
    CancelNotice,
    Pace,
    Record,
    RunningEntry,
    RunningJob,
    SetAside,
    WorkerRecord,
    parse_record,
)


class Ledger(Deliveries, Cancels, Pauses, Heartbeats):
    """The fleet's delivery bookkeeping in Redis: each concern in a module of its own (deliveries,
    cancels, pauses, heartbeats), over one client and one set of scripts (book.py)."""

    @classmethod
    def from_settings(cls, settings) -> "Ledger":
        """The ledger on the fleet's Redis, with the settings' lease and retention."""
        return cls(settings.redis_url, settings.lease_s, settings.result_expires_s)


__all__ = [
    "HEARTBEAT_S", "Admission", "Book", "CancelNotice", "Lease", "Ledger", "Pace", "Record", "RunningEntry",
    "RunningJob", "SetAside", "WorkerRecord", "parse_record", "run_cancel_listener", "run_heartbeat", "run_sweeper",
]  # fmt: skip
