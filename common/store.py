"""The shared store: an fsspec URL (a local folder by default, s3://bucket/prefix in clusters).

Layout (docs/design.md): videos/<key>.{mp4,png,json}, batches/<batch>/manifest.jsonl and the
workers' compile-cache/<key>.{bin,json}.
"""

import contextlib
import datetime
import os
import uuid

import fsspec

from common.errors import StoreError
from common.protocol import RenderResult


class Store:
    """Reads and writes files under one store URL; every write is seen whole or not at all."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self._local = "file" in _protocols(self.fs)
        if self._local:
            self.root = os.path.abspath(self.root)

    def uri(self, relpath: str) -> str:
        """The full URI of a store path, as users and other tools should see it."""
        if self._local:
            return os.path.join(self.root, relpath)
        return self.fs.unstrip_protocol(self._path(relpath))

    @property
    def location(self) -> str:
        """Where the store is, as the URIs of its files begin: a local folder's absolute path, or
        a URL such as s3://bucket/prefix (what a read policy allows, common/reading.py)."""
        return self.root if self._local else self.fs.unstrip_protocol(self.root).rstrip("/")

    def _path(self, relpath: str) -> str:
        parts = relpath.split("/")
        if relpath.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise StoreError(f'store path "{relpath}" must be relative and stay inside the store')
        return f"{self.root}/{relpath}"

    def exists(self, relpath: str) -> bool:
        """Whether a file is in the store."""
        return self._call(self.fs.exists, relpath)

    def list_folder(self, relpath: str, kind: str = "directory") -> list[str]:
        """The names of the folders (or, with kind="file", the files) directly under a store
        folder ([] if there is none)."""
        try:
            entries = self._call(lambda path: self.fs.ls(path, detail=True), relpath)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(e["name"].rstrip("/")) for e in entries if e["type"] == kind)

    def modified(self, relpath: str) -> str | None:
        """When a file was last written (ISO 8601, UTC), or None if the store cannot say."""
        try:
            when = self._call(self.fs.modified, relpath)
        except (FileNotFoundError, NotImplementedError, StoreError):
            return None
        return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def size(self, relpath: str) -> int:
        """A file's size in bytes (to bound a read before making it)."""
        return self._call(self.fs.size, relpath)

    def read_bytes(self, relpath: str) -> bytes:
        """A file's contents."""
        return self._call(self.fs.cat_file, relpath)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write a file so no reader sees half of it; returns its URI."""
        path = self._path(relpath)
        try:
            if self._local:
                write_atomically(path, data)
            else:
                # Object stores make an object visible only once its upload completes.
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {self.uri(relpath)}: {exc}") from exc
        return self.uri(relpath)

    def delete(self, relpath: str) -> None:
        """Remove a file (gone already: nothing to do)."""
        try:
            self._call(self.fs.rm_file, relpath, "delete")
        except FileNotFoundError:
            pass

    def delete_folder(self, relpath: str) -> None:
        """Remove a folder and all it holds (gone already: nothing to do)."""
        try:
            self._call(lambda path: self.fs.rm(path, recursive=True), relpath, "delete")
        except FileNotFoundError:
            pass

    def _call(self, fn, relpath: str, verb: str = "read"):
        path = self._path(relpath)
        try:
            return fn(path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot {verb} {self.uri(relpath)}: {exc}") from exc


def write_atomically(path: str, data: bytes) -> None:
    """Write a local file so no reader sees half of it: a temporary name beside the target, then a
    rename (atomic on one filesystem); a failed write (a full disk) leaves nothing behind."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def video_path(key: str, suffix: str) -> str:
    """Where a job's output lives in the store: videos/<key>.<suffix>."""
    return f"videos/{key}.{suffix}"


def video_exists(store: Store, key: str) -> bool:
    """Whether a job's video is in the store: the truth for "done" (its MP4 is written last)."""
    return store.exists(video_path(key, "mp4"))


OUTPUT_SUFFIXES = {"video": "mp4", "poster": "png", "metadata": "json"}


LIST_ABOVE = 1000  # keys to look for: above this many, one listing of videos/ beats a lookup each


def videos_present(store: Store, keys) -> set[str]:
    """Which of these keys have their video in the store (what `video_exists` says of each): a
    lookup per key for a few; for many, one listing of videos/ (100,000 HEAD requests on S3 would
    take hours, a listing takes one request per 1,000 videos)."""
    keys = set(keys)
    if len(keys) <= LIST_ABOVE:
        return {key for key in keys if video_exists(store, key)}
    names = set(store.list_folder("videos", kind="file"))
    return {key for key in keys if f"{key}.mp4" in names}


def output_uris(store: Store, key: str) -> dict:
    """Where a job's outputs are (or will be): {"video": …, "poster": …, "metadata": …}."""
    return {kind: store.uri(video_path(key, suffix)) for kind, suffix in OUTPUT_SUFFIXES.items()}


def render_result(store: Store, key: str, worker: str, status: str, seconds: float | None = None) -> dict:
    """What a `lorafleet.render` task returns for a key whose outputs are in the store (or are being
    written): common/protocol.py's RenderResult, as a dict for Celery's backend."""
    uris = output_uris(store, key)
    return RenderResult(key=key, worker=worker, status=status, seconds=seconds, **uris).model_dump()


def manifest_path(batch: str) -> str:
    """Where a batch's manifest lives in the store."""
    return f"batches/{batch}/manifest.jsonl"


def jobs_path(batch: str) -> str:
    """Where a batch's expanded jobs live in the store (what `lorafleet retry` enqueues again)."""
    return f"batches/{batch}/jobs.jsonl"


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)
