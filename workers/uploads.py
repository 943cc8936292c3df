"""A finished job's MP4 encode and upload, in a background thread while the next job denoises.

Encoding and uploading a 5B job takes about a second in which the GPU would wait. One upload is
in flight at a time: the next job's upload starts only when this one ended, so a slow store slows
the worker down rather than piling frames up in host memory. The job's delivery keeps its lease and
key lock until its upload ended; its result is reported only then (workers/tasks.py).
"""

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait


class Uploads:
    """One background thread running one upload at a time."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self._last: Future | None = None

    def start(self, upload: Callable[[], None]) -> None:
        """Run `upload()` in the background once the previous upload ended (it handles its own errors)."""
        self.wait()
        self._last = self._pool.submit(upload)

    def wait(self) -> None:
        """Until the upload in flight, if any, ended."""
        if self._last is not None:
            wait([self._last])
