"""The layout's promises: common/ imports neither side, and the producer never imports torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit


def test_producer_never_imports_torch():
    code = (
        "import sys, producer.submit, producer.follow, producer.control, producer.sweep, producer.top, producer.prune,"
        " producer.exporter, producer.report, common.job, common.manifest, common.leases;"
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


def test_the_job_schema_is_printed_for_other_clients():
    out = subprocess.run([sys.executable, "-m", "lorafleet", "schema"], cwd=REPO, capture_output=True, text=True)
    schema = json.loads(out.stdout)
    assert out.returncode == 0 and schema["additionalProperties"] is False
    assert {"prompt", "adapters", "lora_scale", "seed", "key"} <= set(schema["properties"])
    assert schema["required"] == ["prompt"]


def test_common_imports_only_the_standard_library_and_declared_base_dependencies():
    """docs/architecture.md's rule: what common/ imports at module level from outside the standard
    library is a base dependency in pyproject.toml, so a producer-only install imports all of
    common/; inside a function it may import an extra's package (declared in that extra)."""
    import ast
    import tomllib
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    def names(requirements) -> set[str]:
        return {Requirement(line).name.lower().replace("_", "-") for line in requirements}

    pyproject = tomllib.load(open(f"{REPO}/pyproject.toml", "rb"))
    base = names(pyproject["project"]["dependencies"]) | {"pydantic-core"}  # pydantic's own core, pinned by it
    extras = set().union(*map(names, pyproject["project"]["optional-dependencies"].values()))
    providers = packages_distributions()
    undeclared = {}
    for path in sorted(Path(REPO, "common").rglob("*.py")):
        tree = ast.parse(path.read_text())
        in_functions = {
            id(inner) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                found = [node.module]
            for name in found:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "common":
                    continue
                distributions = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                allowed = base | extras if id(node) in in_functions else base
                if not distributions & allowed:
                    undeclared.setdefault(f"{path.name}: {top}", sorted(distributions))
    assert undeclared == {}
