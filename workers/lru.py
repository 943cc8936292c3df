"""The worker's one cache shape: a least-recently-used map with a byte budget, counting hits and misses
(adapters in host memory, prompt embeddings, decoded input images)."""

from collections import OrderedDict
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CacheCounts:
    """One cache's counters since the worker started, as its metrics, the job metadata and the
    upload's log line read them (workers/renderer.py: CacheStats)."""

    hits: int
    misses: int
    evictions: int | None = None  # a cache that never evicts (the adapter files' on disk) has none
    entries: int | None = None
    bytes: int | None = None

    def as_dict(self) -> dict:
        """As the job metadata holds it: the counters this cache has."""
        return {name: value for name, value in asdict(self).items() if value is not None}


class LRU:
    """A least-recently-used map with a byte budget, counting its hits and misses."""

    def __init__(self, budget_bytes: int, size=lambda value: 0):
        self.budget_bytes = budget_bytes
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def get(self, key):
        """The cached value, or None (counted as a miss)."""
        if key in self.items:
            self.hits += 1
            self.items.move_to_end(key)
            return self.items[key]
        self.misses += 1
        return None

    def put(self, key, value) -> None:
        """Cache a value, evicting the least recently used past the budget (never the newest)."""
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > 1 and self.nbytes > self.budget_bytes:
            self.items.popitem(last=False)
            self.evictions += 1

    @property
    def nbytes(self) -> int:
        """Bytes the cached values take."""
        return sum(self.size(value) for value in self.items.values())

    def stats(self) -> CacheCounts:
        """Hits, misses, evictions, entries and bytes, for logs and job metadata."""
        return CacheCounts(self.hits, self.misses, self.evictions, len(self.items), self.nbytes)
