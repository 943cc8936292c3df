"""`lorafleet` with one fault planted, for the poison-job test: a job whose prompt is
$LORAFLEET_TEST_KILL_PROMPT kills its worker with SIGKILL once rendering starts (after its lease is
taken and its delivery counted), as a job that crashes the GPU driver or the OOM killer would.

Run as `python -m tests.poison_worker worker --device cpu`; production code carries no such hook.
"""

import os
import signal
import sys

import workers.tasks
from lorafleet.cli import main

KILL_PROMPT = os.environ["LORAFLEET_TEST_KILL_PROMPT"]
render_frames = workers.tasks.render_frames


def render_or_die(renderer, job, *args, **kwargs):
    if job["prompt"] == KILL_PROMPT:
        os.kill(os.getpid(), signal.SIGKILL)
    return render_frames(renderer, job, *args, **kwargs)


workers.tasks.render_frames = render_or_die

if __name__ == "__main__":
    sys.exit(main())
