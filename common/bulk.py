"""Reading many small objects at once (100,000 results, a 100,000-line manifest) without Python's
cyclic garbage collector running through the whole heap in the middle of it."""

import gc
from contextlib import contextmanager


@contextmanager
def paused_gc():
    """Pause the cyclic collector for a bulk read: what it allocates is short-lived and acyclic,
    while a full collection over a big batch's entries costs more than the read itself (one poll
    of 100,000 results: 0.6 s with the collector, 0.16 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
