"""torch.compile's artifacts, shared by the fleet through the store.

Compiling CogVideoX-5B's transformer on an H200 takes 20 s by blocks (the default) and a minute
and a half whole, on every worker start; with the artifacts, 7 s. The first worker to compile a
given model architecture, precision, render size, compile scope, GPU architecture and software
stack saves what torch made (`torch.compiler.save_cache_artifacts()`: inductor's kernels and
graphs, 7 to 9 MB by blocks) under a key of all of those:

    compile-cache/<key>.bin    the artifacts
    compile-cache/<key>.json   what the key stands for, and the artifacts' size and sha256 (written last)

Every later worker with the same key loads them before compiling and compiles in seconds. A
missing, changed, oversized or unreadable entry is a warning and a compile from scratch, never a
failed start.

The artifacts are torch's own: they hold pickles and generated code that the worker runs, and an
entry's keys name files that torch writes under its cache folder. So whoever may write the store
could run code on the workers, or (with a key that is an absolute path) write a file anywhere the
worker user can. Hence: entries are shared only with `LORAFLEET_COMPILE_CACHE_SECRET` set (the same
on every worker; a set but empty one is refused at start). Each entry is signed (HMAC-SHA256 over
its key and content) and one without this fleet's signature is never loaded; without a secret a
worker neither loads nor saves, and compiles on its own. And before torch sees a signed entry,
every artifact in it whose key would place a file outside torch's cache folder is refused.
"""

import hashlib
import hmac
import json
import logging
import os
import platform
import sys
from importlib import metadata
from itertools import chain

import torch

from common.store import Store

log = logging.getLogger("lorafleet.compile")
FOLDER = "compile-cache"
MAX_BYTES = 2 * 2**30  # 5B's artifacts are 7 to 23 MB; anything near this is not torch's
MAX_DESCRIPTION_BYTES = 64 * 1024


def identity(
    transformer_config: dict,
    precision: str,
    size: tuple[int, int, int],
    backend: str,
    scope: str,
    device,
    attention: str = "sdpa",
    cache: str = "",
) -> dict:
    """Everything compiled code depends on: the architecture (not the weights: a fine-tune shares
    its base's artifacts), the precision and attention kernel, the render size, the GPU's
    architecture, the software, a draft tier's cache hook (which leaves its modules out of the
    graphs). (The kernel and the hook are named only when set: the entries shared before either
    could be chosen stay valid.)"""
    architecture = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}"
    else:
        arch = f"cpu-{platform.machine()}"
    return {
        "transformer": hashlib.sha256(json.dumps(architecture, sort_keys=True, default=str).encode()).hexdigest(),
        "precision": precision,
        "size": list(size),
        "backend": backend,
        "scope": scope,
        "gpu_arch": arch,
        "cuda": torch.version.cuda,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        **{package: _version(package) for package in ("torch", "triton", "diffusers", "torchao")},
        **({"attention": attention} if attention != "sdpa" else {}),
        **({"cache": cache} if cache else {}),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cache_key(described: dict) -> str:
    """The store key of an identity: the SHA-256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(described, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_artifacts(data: bytes) -> None:
    """Hand artifacts to torch's caches, as `torch.compiler.load_cache_artifacts` does, after
    refusing any whose key would place a file outside torch's cache folder (torch joins keys onto
    it: an absolute key or `..` writes anywhere). Reading them runs nothing; torch's caches load
    their content later, when compiling."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    from torch.compiler._cache import CacheArtifactManager

    artifacts = CacheArtifactManager.deserialize(data)
    if artifacts is None:
        raise ValueError("torch cannot read it")
    root = os.path.realpath(cache_dir())  # the folder torch joins keys onto, as it resolves it
    for artifact in chain(*artifacts.values()):
        key = str(artifact.key)
        if "\0" in key or os.path.isabs(key) or not os.path.realpath(os.path.join(root, key)).startswith(root + os.sep):
            raise ValueError(f"its {artifact.type()} artifact {key[:80]!r} would write outside torch's cache folder")
    CacheArtifactManager.populate_caches(artifacts)


class CompileCache:
    """One worker's entry in the store's compile cache, signed with the fleet's secret; no store:
    nothing shared."""

    def __init__(self, store: Store | None, described: dict, secret: bytes):
        if not secret:
            raise ValueError("a compile cache needs the fleet's secret")
        self.store = store
        self.described = described
        self.key = cache_key(described)
        self.secret = secret

    def _signature(self, sha256: str) -> str:
        """This fleet's signature of an entry (its key and content)."""
        return hmac.new(self.secret, f"{self.key}:{sha256}".encode(), hashlib.sha256).hexdigest()

    def _path(self, suffix: str) -> str:
        return f"{FOLDER}/{self.key}.{suffix}"

    def load(self) -> bool:
        """Load the shared artifacts into torch's caches, before compiling; False if there are none to use."""
        if self.store is None:
            return False
        try:
            if not self.store.exists(self._path("json")):
                return False
            if self.store.size(self._path("json")) > MAX_DESCRIPTION_BYTES:
                raise ValueError("its description is too large")
            entry = json.loads(self.store.read_bytes(self._path("json")))
            if not isinstance(entry, dict) or entry.get("identity") != self.described:
                raise ValueError("its description does not match its key")
            size = self.store.size(self._path("bin"))
            if size != entry.get("bytes") or size > MAX_BYTES:
                raise ValueError(f"it holds {size} bytes, its description says {entry.get('bytes')}")
            signature = self._signature(str(entry.get("sha256")))
            if not hmac.compare_digest(signature, str(entry.get("signature"))):
                raise ValueError("it is not signed with this fleet's LORAFLEET_COMPILE_CACHE_SECRET")
            data = self.store.read_bytes(self._path("bin"))
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise ValueError("its content does not match its sha256")
            load_artifacts(data)
        except Exception as exc:  # a bad entry costs a compile, never the worker
            log.warning("compile cache %s: not used (%s): compiling from scratch", self.key[:12], exc)
            return False
        return True

    def save(self) -> int:
        """Share what this process compiled; returns the bytes written (0: nothing to share)."""
        if self.store is None:
            return 0
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return 0
        data = artifacts[0]
        sha256 = hashlib.sha256(data).hexdigest()
        entry = {"identity": self.described, "bytes": len(data), "sha256": sha256, "signature": self._signature(sha256)}
        try:
            self.store.write_bytes(self._path("bin"), data)
            self.store.write_bytes(self._path("json"), json.dumps(entry, indent=2).encode())
        except Exception as exc:  # the next worker compiles from scratch too
            log.warning("compile cache %s: cannot share the artifacts: %s", self.key[:12], exc)
            return 0
        return len(data)
