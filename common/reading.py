"""The bounded-reading layer every read of outside input goes through: adapters, input images, jobs
files, the hub probe. A read policy (allowed schemes and local roots) decides on the URL as fsspec
will open it; only regular files are read (never a device or FIFO), up to a size, remote reads
within a time. Nothing here knows what the bytes are: common/adapters.py and common/images.py do.
"""

import hashlib
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import fsspec

from common.errors import AdapterError


@dataclass(frozen=True)
class ReadPolicy:
    """Where adapters may be read from, and how much and how long: every adapter read, at submit
    and on a worker, goes through one policy (docs/design.md: Trust)."""

    schemes: tuple[str, ...]
    roots: tuple[str, ...]  # local folders adapters may be read from; none: any local path
    max_bytes: int
    timeout_s: float
    # The shared store's location (Store.location), if reads may use it: always allowed, and where
    # a relative path that names no local file is looked for.
    store: str | None = None

    @classmethod
    def from_settings(cls, settings, store: str | None = None) -> "ReadPolicy":
        """The policy the settings describe (LORAFLEET_ADAPTER_SCHEMES, _ROOTS, _MAX_ADAPTER_MB,
        _READ_TIMEOUT_S), with the store at `store` (Store.location) always allowed."""
        return cls(
            tuple(settings.adapter_schemes),
            tuple(os.path.realpath(os.path.expanduser(root)) for root in settings.adapter_roots),
            settings.max_adapter_mb * 2**20,
            settings.read_timeout_s,
            store,
        )

    def allows(self, url: str) -> bool:
        """Whether a URL may be read: the store always; else an allowed scheme and, for a local
        file, a path under an allowed root (symbolic links followed first). It decides on the URL
        as fsspec opens it: schemes in any case (`FILE://` is a local file), and never a chained
        URL (`s3://b/k::file:///etc/passwd` opens the last one)."""
        if "::" in url:
            return False
        url = normalized(url)
        if self.store is not None and in_store(url, self.store):
            return True
        path = local_path(url)
        if path is None:
            return url_scheme(url) in self.schemes
        real = os.path.realpath(path)
        return "file" in self.schemes and (
            not self.roots or any(real == root or real.startswith(root + os.sep) for root in self.roots)
        )

    def refusal(self, uri: str, what: str = "adapter") -> AdapterError:
        """The one error for anything outside the policy (it never says whether a file exists)."""
        roots = f"; local roots: {', '.join(self.roots)}" if self.roots else ""
        return AdapterError(
            f'{what} "{uri[:200]}" is outside the allowed locations (schemes: {", ".join(self.schemes)}{roots}; '
            "LORAFLEET_ADAPTER_SCHEMES, LORAFLEET_ADAPTER_ROOTS)"
        )


def read_first(
    uri: str,
    policy: ReadPolicy,
    what: str,
    files_in: Callable[[str], list[str]] = lambda at: [at],
    max_bytes: int | None = None,
    also: tuple[str, ...] | list[str] = (),
) -> tuple[str, bytes]:
    """Find what a URI a user wrote means and read it: the first of its candidate URLs (as
    `candidate_urls` orders them, then `also`) that the policy allows and holds a file; returns that URL
    and its bytes, read bounded (`max_bytes`, else the policy's). Raises AdapterError for a URI
    whose every candidate is refused, and for one whose allowed candidates hold no file, naming
    every URL checked. `what` names the file in errors ("adapter", "image")."""
    candidates = [url for url in [*candidate_urls(uri, policy.store, files_in), *also] if policy.allows(url)]
    if not candidates:
        raise policy.refusal(uri, what)
    for url in candidates:
        data = read_bounded(url, max_bytes or policy.max_bytes, policy.timeout_s, what)
        if data is not None:
            return url, data
    raise AdapterError(f'{what} "{uri}" not found (checked {", ".join(candidates)})')


def read_unchanged(url: str, sha256: str, policy: ReadPolicy, what: str, max_bytes: int) -> bytes:
    """The bytes at a resolved URL, read again where a finished job says its file is: refused
    outside the policy, and unless its content hash is still the one the job was submitted with
    (a path is never trusted to hold what was submitted)."""
    if not policy.allows(url):
        raise policy.refusal(url, what)
    data = read_bounded(url, max_bytes, policy.timeout_s, what)
    if data is None:
        raise AdapterError(f"{what} {url} is gone since the job was submitted")
    check_unchanged(what, url, hashlib.sha256(data).hexdigest(), sha256)
    return data


def candidate_urls(uri: str, store: str | None, files_in: Callable[[str], list[str]] = lambda at: [at]) -> list[str]:
    """The URLs a URI a user wrote may mean, in the order they are tried: a URL as it is, a local
    path, a path inside the store at `store` (Store.location); `files_in(location)` names the files
    a location stands for (an adapter's folder holds its weights file). A local file (or a FIFO or
    device, refused when read) stands for itself."""
    if "://" in uri:
        return files_in(normalized(uri))
    local = os.path.abspath(os.path.expanduser(uri))
    candidates = [local] if os.path.exists(local) and not os.path.isdir(local) else files_in(local)
    if store is not None and not uri.startswith(("/", "~")):
        inside = os.path.join(store, uri) if "://" not in store else f"{store}/{uri}"
        if in_store(inside, store):  # `../x` names no file of the store
            candidates.extend(files_in(inside))
    return candidates


def in_store(url: str, store: str) -> bool:
    """Whether a URL names a file inside the store at `store` (Store.location); for a local store,
    symbolic links followed."""
    if "://" not in store:
        path = url.removeprefix("file://")
        return "://" not in path and os.path.realpath(path).startswith(os.path.realpath(store) + os.sep)
    prefix = store.rstrip("/") + "/"
    return url.startswith(prefix) and ".." not in url[len(prefix) :].split("/")


def check_unchanged(what: str, url: str, found: str, wanted: str) -> None:
    """Refuse a file (an adapter, an image) whose content hash is not the one its job was submitted with."""
    if found != wanted:
        raise AdapterError(
            f"{what} {url} changed since it was submitted (sha256 {found[:12]}, job wants {wanted[:12]})"
        )


def file_chunks(path: str, size: int = 16 * 2**20):
    """A local file's bytes, in chunks."""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
LOCAL_SCHEMES = ("file", "local")  # fsspec's names of the local filesystem


def url_scheme(url: str) -> str | None:
    """A URL's scheme, lowercased as fsspec matches it; None for a plain path."""
    found = SCHEME.match(url)
    return found[1].lower() if found else None


def normalized(url: str) -> str:
    """The URL with its scheme lowercased (`File:///x` → `file:///x`); a plain path as it is."""
    scheme = url_scheme(url)
    return url if scheme is None else f"{scheme}://{url[SCHEME.match(url).end() :]}"


def local_path(url: str) -> str | None:
    """The filesystem path of a local file URL (a plain path, file:// or local://, any case), else None."""
    scheme = url_scheme(url)
    if scheme is None:
        return url
    return url[SCHEME.match(url).end() :] if scheme in LOCAL_SCHEMES else None


def read_bounded(url: str, max_bytes: int, timeout_s: float, what: str = "adapter") -> bytes | None:
    """A file's bytes, or None if there is no file at `url` (a folder counts as none). Only a
    regular file is read (never a device or FIFO), only up to `max_bytes`, and a remote read gives
    up after `timeout_s` without an answer; errors name the file as `what` ("adapter", "image")."""
    if "::" in url:
        raise AdapterError(f"{what} {url[:200]}: chained URLs are not read")
    url = normalized(url)
    if url.startswith("hf://"):
        return _read_hub(url, max_bytes, timeout_s)
    path = local_path(url)
    if path is not None:
        return _read_local(path, max_bytes, what)
    try:
        fsspec.get_filesystem_class(url_scheme(url))
    except (ImportError, ValueError) as exc:  # an allowed scheme whose filesystem is not installed (gs: gcsfs)
        raise AdapterError(f"{what} {url[:200]} cannot be read here: {str(exc).splitlines()[0][:200]}") from None
    try:
        fs, fs_path = fsspec.core.url_to_fs(url, **_timeouts(url, timeout_s))
        info = fs.info(fs_path)
        if info.get("type") == "directory":
            return None
        _check_size(url, info.get("size"), max_bytes, what)
        with fs.open(fs_path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (OSError, TimeoutError) as exc:
        raise AdapterError(f"{what} {url} could not be read: {type(exc).__name__}: {exc}") from exc
    _check_size(url, len(data), max_bytes, what)
    return data


def check_regular_file(path: str, max_bytes: int) -> None:
    """Raise AdapterError unless `path` is a regular file of at most `max_bytes` (symbolic links followed)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise AdapterError(f"adapter {path} is not a regular file (a device, FIFO or socket): not read")
    _check_size(path, info.st_size, max_bytes)


def open_regular_file(path: str):
    """A local file opened for reading, or None if it is not a regular file (symbolic links
    followed), found without blocking: opening a FIFO waits for a writer, a device reads forever.
    Raises what `open` raises (FileNotFoundError, IsADirectoryError, ...)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return os.fdopen(fd, "rb")
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(path)
    return None


def _read_local(path: str, max_bytes: int, what: str = "adapter") -> bytes | None:
    try:
        f = open_regular_file(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise AdapterError(f"{what} {path} could not be read: {exc.strerror}") from None
    if f is None:
        raise AdapterError(f"{what} {path} is not a regular file (a device, FIFO or socket): not read")
    with f:
        _check_size(path, os.fstat(f.fileno()).st_size, max_bytes, what)
        data = f.read(max_bytes + 1)
    _check_size(path, len(data), max_bytes, what)
    return data


def _check_size(url: str, size, max_bytes: int, what: str = "adapter") -> None:
    if size is None or size > max_bytes:
        told = "of unknown size" if size is None else f"larger than {max_bytes // 2**20} MiB"
        setting = " (LORAFLEET_MAX_ADAPTER_MB)" if what == "adapter" else ""
        raise AdapterError(f"{what} {url} is {told}{setting}: not read")


def _timeouts(url: str, timeout_s: float) -> dict:
    """fsspec storage options that bound a remote read's connect and read time."""
    scheme = urlsplit(url).scheme
    if scheme in ("s3", "s3a"):
        return {
            "config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s, "retries": {"max_attempts": 2}}
        }
    if scheme in ("gs", "gcs"):
        return {"timeout": timeout_s}
    if scheme in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout_s)}}
    return {}


_hub_checked: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout_s: float) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout_s` (asked once a
    minute at most): offline, the hub client retries for over 20 s before it gives up."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True  # the client answers from its local cache at once
    host = urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    checked_at, reachable = _hub_checked.get(host, (0.0, False))
    if time.monotonic() - checked_at > 60:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            reachable = True
        except OSError:
            reachable = False
        _hub_checked[host] = (time.monotonic(), reachable)
    return reachable


def _read_hub(url: str, max_bytes: int, timeout_s: float) -> bytes | None:
    repo, _, filename = url[len("hf://") :].rpartition("/")
    if not hub_reachable(min(timeout_s, 5.0)):
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, filename, etag_timeout=timeout_s)
    except Exception:
        return None
    return _read_local(path, max_bytes)
