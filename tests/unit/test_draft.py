"""The draft tier: diffusers' cache hooks on the tiny model's transformer (workers/draft.py). A draft
renders other frames than the exact tier, keyed apart from them; each render starts from a clean
hook state, even after one stopped midway; compiled, its hooked modules never recompile a graph."""

import numpy as np
import pytest
import torch

from benchmarks.memory_tiers import finished_job
from common.errors import ModelError, RenderError
from common.settings import DraftCache, Settings
from workers.renderer import Renderer, render_frames

pytestmark = [pytest.mark.unit, pytest.mark.torch]


def renderer(tiny, tmp_path, cache: DraftCache | None, **settings) -> Renderer:
    return Renderer(tiny["model"], "cpu", Settings(adapter_cache_dir=str(tmp_path), **settings), "t", cache=cache)


def frames(renderer: Renderer, tiny, progress=None, **fields) -> np.ndarray:
    fields = {"prompt": "a cat", "seed": 1, "steps": 12, "adapters": [tiny["style"]], **fields}
    return np.stack(renderer.render(finished_job(fields, renderer.info), progress)[0])


@pytest.mark.parametrize("hook", ["taylorseer", "fastercache", "pab"])
def test_a_draft_renders_other_frames_under_another_key(tiny, tmp_path, hook):
    exact, draft = renderer(tiny, tmp_path, None), renderer(tiny, tmp_path, DraftCache(hook=hook))
    job = finished_job({"prompt": "a cat", "seed": 1, "steps": 12}, draft.info)
    assert job.key != finished_job({"prompt": "a cat", "seed": 1, "steps": 12}, exact.info).key
    first = frames(draft, tiny)
    assert not np.array_equal(first, frames(exact, tiny))  # the hook skipped or predicted some work
    assert np.array_equal(first, frames(draft, tiny))  # and starts each render afresh
    metadata = render_frames(draft, job).metadata
    assert metadata["cache"] == {"hook": hook, "params": DraftCache(hook=hook).params}


def test_a_render_stopped_midway_leaves_nothing_for_the_next(tiny, tmp_path):
    draft = renderer(tiny, tmp_path, DraftCache(hook="taylorseer"))
    clean = frames(draft, tiny, seed=2)

    def stop(step, steps):
        if step == 7:
            raise RenderError("cancelled")

    with pytest.raises(RenderError):
        frames(draft, tiny, progress=stop)
    assert np.array_equal(frames(draft, tiny, seed=2), clean)


def test_a_compiled_draft_keeps_its_graphs(tiny, tmp_path):
    """The hooked attention runs outside the compiled blocks: a job compiles nothing more, and renders
    what the eager draft renders. Dynamo guards the same strides whatever the backend; aot_eager
    spares the test inductor's C++ builds (inductor itself: tests/integration/test_compile_cache.py)."""
    cache = DraftCache(hook="taylorseer")
    compiled = renderer(tiny, tmp_path, cache, compile=True, compile_backend="aot_eager")
    compiled._stance = lambda: torch.compiler.set_stance("fail_on_recompile")
    np.testing.assert_allclose(frames(compiled, tiny), frames(renderer(tiny, tmp_path, cache), tiny), atol=1e-4)


def test_first_block_cache_needs_two_blocks(tiny, tmp_path):
    with pytest.raises(ModelError, match="at least two blocks"):
        renderer(tiny, tmp_path, DraftCache(hook="first-block"))
