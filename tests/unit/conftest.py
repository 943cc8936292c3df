"""The unit tier runs on a producer-only install too: without torch, the modules that import the
render stack at their top are not collected (the rest skip their torch tests: tests/conftest.py)."""

from tests.conftest import HAS_TORCH

TORCH_MODULES = [
    "test_attention.py", "test_draft.py", "test_formats.py", "test_memory.py", "test_model.py", "test_model_kinds.py",
    "test_speed_tiers.py", "test_uploads.py", "test_variants.py",
]  # fmt: skip
collect_ignore = [] if HAS_TORCH else TORCH_MODULES
