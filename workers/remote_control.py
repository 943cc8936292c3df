"""Celery's remote control as a lorafleet worker answers it: `revoke` (Flower's Revoke and
Terminate buttons, `celery control revoke [--terminate]`) cancels the jobs it names, as
`lorafleet cancel --job` does.

A worker runs its job in Celery's threads pool (one job at a time, the consumer's loop free to
answer), which cannot kill one job: a terminating revoke raised NotImplementedError in the worker
and the job rendered on while Flower said "Revoked". Here every revoke, terminating or not, sets
the jobs' cancel flags and sends the notice `lorafleet cancel` sends: a running job stops at its
next denoising step, a queued one is refused by whichever worker takes it, and both are recorded
cancelled. Celery's own revoke still runs, without terminate, for its bookkeeping (the worker's
revoked set, a queued task's REVOKED state).
"""

from celery.utils.functional import maybe_list
from celery.worker import control

from common.leases import Ledger

ANSWER = "running ones stop at their next denoising step, queued ones never start (as `lorafleet cancel --job`)"


def answer_revoke_as_cancel(ledger: Ledger) -> None:
    """Make this process's workers answer `revoke` by cancelling the jobs it names."""
    celerys_revoke = getattr(control.Panel.data["revoke"], "celerys_revoke", control.Panel.data["revoke"])

    @control.control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")
    def revoke(state, task_id, terminate=False, signal=None, **kwargs):
        """Cancel tasks by id: running ones stop at their next step, queued ones never start."""
        task_ids = sorted(set(maybe_list(task_id) or []))
        if task_ids:
            ledger.cancel(None, task_ids)
            celerys_revoke(state, task_ids, terminate=False, signal=signal, **kwargs)
        return {"ok": f"tasks {', '.join(task_ids)} cancelled: {ANSWER}"}

    revoke.celerys_revoke = celerys_revoke
