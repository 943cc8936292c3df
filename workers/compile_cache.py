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

The artifacts are torch's own format: pickled, and holding generated code that the worker runs. So
whoever may write the store could run code on the workers. With `LORAFLEET_COMPILE_CACHE_SECRET`
set (the same on every worker), entries are signed (HMAC-SHA256 over the key and the content) and
one without this fleet's signature is never loaded; `LORAFLEET_COMPILE_CACHE=false` shares nothing.
"""

import hashlib
import hmac
import json
import logging
import platform
import sys
from importlib import metadata

import torch

from common.store import Store

log = logging.getLogger("lorafleet.compile")
FOLDER = "compile-cache"
MAX_BYTES = 2 * 2**30  # 5B's artifacts are 7 to 23 MB; anything near this is not torch's
MAX_DESCRIPTION_BYTES = 64 * 1024


def identity(
    transformer_config: dict, precision: str, size: tuple[int, int, int], backend: str, scope: str, device
) -> dict:
    """Everything compiled code depends on: the architecture (not the weights: a fine-tune shares
    its base's artifacts), the precision, the render size, the GPU's architecture, the software."""
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
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cache_key(described: dict) -> str:
    """The store key of an identity: the SHA-256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(described, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class CompileCache:
    """One worker's entry in the store's compile cache; no store: nothing shared."""

    def __init__(self, store: Store | None, described: dict, secret: bytes | None = None):
        self.store = store
        self.described = described
        self.key = cache_key(described)
        self.secret = secret

    def _signature(self, sha256: str) -> str | None:
        """This fleet's signature of an entry (its key and content), or None without a secret."""
        if self.secret is None:
            return None
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
            if signature is not None and not hmac.compare_digest(signature, str(entry.get("signature"))):
                raise ValueError("it is not signed with this fleet's LORAFLEET_COMPILE_CACHE_SECRET")
            data = self.store.read_bytes(self._path("bin"))
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise ValueError("its content does not match its sha256")
            torch.compiler.load_cache_artifacts(data)
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
