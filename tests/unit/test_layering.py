"""The layout's promises: common/ imports neither side, and the producer never imports torch."""

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit


def test_producer_never_imports_torch():
    code = (
        "import sys, producer.submit, producer.follow, producer.control, producer.sweep, common.job, common.manifest;"
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


def test_the_readme_exit_code_table_is_the_code():
    from common.errors import ExitCode

    readme = open(f"{REPO}/README.md").read()
    table = re.search(r"Every `lorafleet` process ends with one of these codes.*?\n\n(.*?)\n\n", readme, re.S).group(1)
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", table, re.M))
    assert sorted(map(int, rows)) == sorted(code.value for code in ExitCode)


def test_the_job_schema_is_printed_for_other_clients():
    out = subprocess.run([sys.executable, "-m", "lorafleet", "schema"], cwd=REPO, capture_output=True, text=True)
    schema = json.loads(out.stdout)
    assert out.returncode == 0 and schema["additionalProperties"] is False
    assert {"prompt", "adapters", "lora_scale", "seed", "key"} <= set(schema["properties"])
    assert schema["required"] == ["prompt"]
