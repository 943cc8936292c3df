"""What the producer and the workers share: the job schema and its key, settings, the store, adapters."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorafleet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
