"""A checked job's files found and read under the read policy (common/reading.py), each known by
its content hash, and the job keyed (common/job.py): the third step from what a user wrote to a
Job (common/jobs_file.py), on the producer, or on the worker for a message that carries no hashes.
"""

import functools

from common.adapters import AdapterFile, read_adapter
from common.errors import AdapterError
from common.images import ImageFile, read_image
from common.job import Job, JobContent, ResolvedAdapter, ResolvedImage
from common.job_spec import JobSpec
from common.lora_formats import check_shapes, detect_layout
from common.model import ModelInfo
from common.reading import ReadPolicy
from common.store import Store


class AdapterResolver:
    """Resolves adapter and image URIs to files under a read policy, reading each distinct URI once
    per resolver: one per submitted file, one per worker message (a worker never caches by path)."""

    def __init__(self, policy: ReadPolicy):
        self.policy = policy
        self._seen: dict[str, AdapterFile | AdapterError] = {}
        self._images: dict[str, ImageFile | AdapterError] = {}
        self._fits: set[tuple[str, str]] = set()  # (adapter hash, model) found to fit the model's layers

    @classmethod
    def from_settings(cls, settings, store: Store | None) -> "AdapterResolver":
        """A resolver under the settings' read policy, the store (if any) always allowed."""
        return cls(ReadPolicy.from_settings(settings, store.location if store is not None else None))

    def resolve(self, uri: str) -> AdapterFile:
        """The adapter file a URI means; raises AdapterError naming what was checked."""
        return self._once(self._seen, uri, lambda: read_adapter(uri, self.policy)[0])

    def image(self, uri: str) -> ImageFile:
        """The image a URI means, read and decoded; raises ImageError naming what was checked."""
        return self._once(self._images, uri, lambda: read_image(uri, self.policy)[0])

    def adapter(self, adapter, model: ModelInfo, given: bool = False) -> ResolvedAdapter:
        """A job's adapter term resolved: its file found and read (and checked against the model's
        layers when they are known, once per file), or, `given`, the URL and hash it carries,
        within the policy."""
        if given:
            return _resolved(
                adapter.uri, adapter.weight, adapter.alpha, adapter.name, self.allowed(adapter.url), adapter.sha256
            )
        found = self.resolve(adapter.uri)
        if model.linear_layers and (found.sha256, model.ref) not in self._fits:
            try:
                check_shapes(
                    detect_layout(list(found.tensors), model.linear_layers), found.shapes(), model.linear_layers
                )
            except AdapterError as exc:
                raise AdapterError(f'adapter "{adapter.uri}": {exc}') from None
            self._fits.add((found.sha256, model.ref))  # a sweep's thousands of jobs name a few adapters
        return _resolved(adapter.uri, adapter.weight, adapter.alpha, adapter.name, found.url, found.sha256)

    def input_image(self, image, given: bool = False) -> ResolvedImage:
        """A job's input image resolved, as `adapter` resolves an adapter."""
        if given:
            return ResolvedImage(uri=image.uri, url=self.allowed(image.url, "image"), sha256=image.sha256)
        found = self.image(image.uri)
        return ResolvedImage(uri=image.uri, url=found.url, sha256=found.sha256)

    def allowed(self, url: str, what: str = "adapter") -> str:
        """A resolved URL, if the read policy allows it; raises AdapterError if not."""
        if not self.policy.allows(url):
            raise self.policy.refusal(url, what)
        return url

    @staticmethod
    def _once(cache: dict, uri: str, read):
        """`read()`'s file, or its error, remembered per URI: each is read once per resolver."""
        if uri not in cache:
            try:
                cache[uri] = read()
            except AdapterError as exc:
                cache[uri] = exc
        found = cache[uri]
        if isinstance(found, AdapterError):
            raise found
        return found


def resolve_job(
    spec: JobSpec, scale: float, seed: int, model: ModelInfo, resolver: AdapterResolver, given: bool = False,
    priority: str | None = None,
) -> Job:
    """One expanded job of a checked spec, its adapters and image resolved to content hashes, keyed,
    at the spec's priority or `priority`.
    `given`: use the URL and content hash each file carries (a producer's message), within the read
    policy, without reading it here: the worker checks the hash when it reads the file to render."""
    adapters = tuple(resolver.adapter(adapter, model, given) for adapter in spec.adapters)
    image = None if spec.image is None else resolver.input_image(spec.image, given)
    fields = {name: getattr(spec, name) for name in JobContent.model_fields if name not in _SET_HERE}
    fields["priority"] = spec.priority or priority  # not part of the key
    return Job.keyed({**fields, "adapters": adapters, "image": image, "lora_scale": scale, "seed": seed}, model)


_SET_HERE = {"adapters", "image", "lora_scale", "seed"}


@functools.lru_cache(maxsize=4096)
def _resolved(uri: str, weight: float, alpha: float | None, name: str | None, url: str, sha256: str) -> ResolvedAdapter:
    # Built once per distinct adapter term (frozen: every job that names it shares it), without a
    # second validation: JobSpec checked every field, the resolver found the rest.
    return ResolvedAdapter.model_construct(uri=uri, weight=weight, alpha=alpha, name=name, url=url, sha256=sha256)
