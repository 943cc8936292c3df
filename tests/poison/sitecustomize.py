"""A fault planted in `lorafleet worker` for the poison-job test, from outside the product: this
folder first on PYTHONPATH makes Python import this file at start. A job whose prompt is
$LORAFLEET_TEST_KILL_PROMPT then kills its worker with SIGKILL once rendering starts (after its
lease is taken and its delivery counted), as a job that crashes the GPU driver or the OOM killer
would. Production code carries no such hook.
"""

import os
import signal

KILL_PROMPT = os.environ.get("LORAFLEET_TEST_KILL_PROMPT")

if KILL_PROMPT:
    import workers.tasks

    render_frames = workers.tasks.render_frames

    def render_or_die(renderer, job, *args, **kwargs):
        if job.prompt == KILL_PROMPT:
            os.kill(os.getpid(), signal.SIGKILL)
        return render_frames(renderer, job, *args, **kwargs)

    workers.tasks.render_frames = render_or_die
