"""GPU tests skip where no GPU is visible (CI, this project's machines), but never silently where
one must be: with LORAFLEET_REQUIRE_GPU=1 (set by benchmarks/device_setup.sh on the GPU machine) a
missing or too old GPU fails each test instead of skipping it."""

import os

import pytest
import torch

REQUIRED = os.environ.get("LORAFLEET_REQUIRE_GPU") == "1"


def gpu_problem(capability: tuple[int, int] = (0, 0)) -> str | None:
    """Why these tests cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() < capability:
        return f"needs a GPU of compute capability {capability[0]}.{capability[1]} or newer (fp8)"
    return None


def needs_gpu(capability: tuple[int, int] = (0, 0)):
    """The mark for a GPU test: skipped without a suitable GPU, failed instead under LORAFLEET_REQUIRE_GPU=1."""
    problem = gpu_problem(capability)
    if problem and REQUIRED:
        return pytest.mark.usefixtures("_fail_without_gpu")
    return pytest.mark.skipif(problem is not None, reason=problem or "")


@pytest.fixture
def _fail_without_gpu(request):
    pytest.fail(f"LORAFLEET_REQUIRE_GPU=1 but {request.node.name} cannot run: no suitable GPU is visible")
