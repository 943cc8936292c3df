"""Pausing a batch and admitting a job: a paused batch's job is set aside (a SetAside record) and
sent again on resume; a cancelled one is refused; both decided in one step with the flags."""

from common.leases.book import Book
from common.leases.records import Admission, SetAside, parse_record
from common.protocol import PAUSED_PREFIX, batch_keys, cancelled_key, cancelled_task_key, paused_key, set_aside_key


class Pauses(Book):
    """The ledger's part that pauses, resumes and admits."""

    def pause(self, batch: str) -> None:
        """Pause a batch: a worker that takes one of its jobs sets it aside instead of starting it."""
        self.redis.set(paused_key(batch), 1)

    def paused_batches(self) -> list[str]:
        """The names of the batches paused now, sorted."""
        names = self.redis.scan_iter(match=PAUSED_PREFIX + "*", count=1000)
        return sorted(name.decode(errors="replace").removeprefix(PAUSED_PREFIX) for name in names)

    def admit(self, batch: str | None, task_id: str, message: dict, queue: str) -> Admission:
        """Whether a job may start, in one round trip: set aside (to be sent again on resume) if
        its batch is paused, refused if its batch or the job itself was cancelled."""
        keys = [cancelled_task_key(task_id)]
        if batch is not None:
            keys += [paused_key(batch), set_aside_key(batch), cancelled_key(batch)]
        entry = SetAside(task_id=task_id, message=message, queue=queue)
        return Admission(self.admit_script(keys=keys, args=[entry.model_dump_json()]))

    def resume(self, batch: str) -> list[SetAside]:
        """Lift a batch's pause; returns the jobs set aside meanwhile (a malformed one skipped, logged)."""
        found = self.resume_script(keys=[paused_key(batch), set_aside_key(batch)])
        entries = (parse_record(SetAside, f"{set_aside_key(batch)}[{i}]", raw) for i, raw in enumerate(found))
        return [entry for entry in entries if entry is not None]

    def forget_batch(self, batch: str) -> None:
        """Drop what Redis keeps of a batch by name (cancel and pause flags, jobs set aside): a
        new batch under a name an earlier one had starts clean."""
        self.redis.delete(*batch_keys(batch))
