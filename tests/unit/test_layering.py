"""The layout's promises: common/ imports neither side, and the producer never imports torch."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit


def test_producer_never_imports_torch():
    code = (
        "import sys, producer.submit, producer.follow, producer.control, common.job, common.manifest;"
        "bad = [m for m in ('torch', 'diffusers', 'workers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_common_imports_neither_producer_nor_workers():
    found = subprocess.run(
        ["grep", "-rnE", r"^\s*(from|import) (producer|workers|lorafleet)\b", "common/"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert found.stdout == ""
