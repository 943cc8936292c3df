"""The README and the documentation site (mkdocs.yml): the README fits on a screen, nothing the
long README said was lost, the site builds with --strict, and its reference pages are the code's."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit
# Each section of the README of 2026-12-06 (982 lines), and the page where it lives now.
MOVED = {
    "Quickstart": "README.md",
    "From the demo to your own fleet": "README.md",
    "Running a fleet on a real model": "docs/how-to/real-model.md",
    "Nothing lost, nothing twice": "docs/explanation/nothing-lost.md",
    "Trust model: who may write to Redis": "docs/explanation/trust-model.md",
    "The job format": "docs/reference/job-format.md",
    "Nightly sweeps across lora_scale and beyond": "docs/how-to/sweeps.md",
    "Which GPU, which settings: memory plans": "docs/how-to/memory-plans.md",
    "Faster renders: speed tiers per model alias": "docs/how-to/speed-tiers.md",
    "Configuration": "docs/reference/configuration.md",
    "Monitoring and health": "docs/how-to/monitoring.md",
    "Running on Kubernetes": "docs/how-to/kubernetes.md",
    "Docker": "docs/how-to/docker.md",
    "Development": "docs/development.md",
}


def read(path: str) -> str:
    return open(os.path.join(REPO, path), encoding="utf-8").read()


def test_the_readme_fits_on_a_screen_and_says_where_the_rest_is():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    for page in sorted(set(MOVED.values()) - {"README.md"}):
        assert f"]({page})" in readme, f"the README does not point to {page}"
        assert os.path.isfile(os.path.join(REPO, page))


@pytest.mark.parametrize("title, page", MOVED.items())
def test_every_section_of_the_old_readme_has_a_home(title, page):
    headings = re.findall(r"^#+ (.+)$", read(page), re.M)
    assert any(heading.startswith(title) for heading in headings), f"{title!r} not a heading of {page}"


def test_the_site_builds_strict_with_reference_pages_generated_from_the_code(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (make install) builds the site")
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    generated = os.path.join(REPO, "docs", "reference", "generated")
    from common.errors import ExitCode
    from common.settings import Settings
    from lorafleet.cli import cli

    cli_page = open(os.path.join(generated, "cli.md")).read()
    assert all(f"## lorafleet {name}\n" in cli_page for name in cli.commands)
    assert "--interval" in cli_page and "Usage: lorafleet top [OPTIONS]" in cli_page
    settings_page = open(os.path.join(generated, "settings.md")).read()
    assert all(f"| `LORAFLEET_{name.upper()}` |" in settings_page for name in Settings.model_fields)
    codes = open(os.path.join(generated, "exit-codes.md")).read()
    assert {int(code) for code in re.findall(r"^\| (\d+) \|", codes, re.M)} == {code.value for code in ExitCode}
    assert '"lora_scale"' in open(os.path.join(generated, "job-schema.md")).read()
    tutorial = (site / "tutorials" / "own-fleet" / "index.html").read_text()
    assert "lorafleet redis --stop" in tutorial and "make demo" in tutorial  # the README's sections, included


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) for each `lorafleet …` and `make …` line of the README's and the docs'
    shell blocks, without its comment, redirections and `&`."""
    pages = ["README.md"] + sorted(
        os.path.relpath(os.path.join(root, name), REPO)
        for root, _, names in os.walk(os.path.join(REPO, "docs"))
        for name in names
        if name.endswith(".md")
    )
    found = []
    for page in pages:
        for language, body in re.findall(r"^```(\w*)\n(.*?)^```", read(page), re.S | re.M):
            if language not in ("", "bash", "sh", "shell", "console"):
                continue
            for line in body.splitlines():
                line = re.split(r"\s+#|\s+[0-9]?>|\s+&\s*$", line.removeprefix("$ "))[0].strip()
                if line.startswith(("lorafleet ", "make ")):
                    found.append((page, line))
    return found


def test_every_command_the_docs_show_parses_as_written():
    """A command the README or the docs show, which cannot all run here (a GPU fleet, a cluster, a
    real model), still parses as written: each `lorafleet` line through the CLI's own parser
    (every command and option exists), each `make` line as a dry run (the target and its recipe)."""
    import shlex
    import warnings

    import click

    from lorafleet.cli import cli

    commands = shown_commands()
    assert len(commands) >= 25 and any(line.startswith("lorafleet workers --gpus") for _, line in commands)
    for page, line in commands:
        words = shlex.split(line)
        if words[0] == "make":
            dry = subprocess.run(["make", "-n", "-s", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
            assert dry.returncode == 0, f"{page}: {line}: {dry.stderr}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # click 8.2's protected_args
                context = cli.make_context("lorafleet", words[1:])
                name, command, rest = cli.resolve_command(context, [*context.protected_args, *context.args])
                command.make_context(name, rest, parent=context)
        except click.ClickException as exc:
            pytest.fail(f"{page}: {line}: {exc.format_message()}")
