"""Cancel flags, per batch and per job: queued jobs are refused at admission (common/leases/
pauses.py), a running one is told at once by a notice on a pub/sub channel that every worker hears,
and, should a notice be missed, finds the flag at its lease's next extension."""

from common.leases.book import Book
from common.leases.records import CancelNotice, parse_record
from common.protocol import CANCELS, cancelled_key, cancelled_task_key


class Cancels(Book):
    """The ledger's part that cancels batches and jobs."""

    def cancel(self, batch: str | None, task_ids: list[str] | None = None) -> None:
        """Mark a batch (or only these tasks, of it or of any batch) cancelled: queued jobs never
        start, and running ones, told by a notice, stop at their next step."""
        names = [cancelled_task_key(t) for t in task_ids] if task_ids else [cancelled_key(batch)]
        for name in names:
            self.redis.set(name, 1, ex=self.ttl_s)
        self.redis.publish(CANCELS, CancelNotice(batch=batch, tasks=task_ids or []).model_dump_json())

    def hear_cancel(self, raw) -> None:
        """Stop this process's running deliveries that a cancel notice names (a malformed notice is
        skipped: anyone who can write to Redis can publish one)."""
        notice = parse_record(CancelNotice, CANCELS, raw)
        for lease in list(self.leases.values()) if notice else []:
            if lease.task_id in notice.tasks:
                lease.cancel("the job")
            elif not notice.tasks and notice.batch is not None and lease.batch == notice.batch:
                lease.cancel(f"batch {notice.batch}")

    def uncancel(self, batch: str, task_ids: list[str] = ()) -> None:
        """Lift a batch's cancel flags (before its jobs are retried)."""
        self.redis.delete(cancelled_key(batch), *(cancelled_task_key(t) for t in task_ids))
