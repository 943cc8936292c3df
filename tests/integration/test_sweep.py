"""A nightly sweep on the tiny model with real Redis and workers, and its report in a real browser."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from producer.report import ssim
from tests.conftest import lorafleet
from tests.helpers import decode_video

pytestmark = pytest.mark.integration


@pytest.fixture
def sweep_spec(tmp_path, tiny) -> str:
    spec = {
        "name": "nightly",
        "prompts": ["a cat walks along the beach", "a dog runs across a field"],
        "adapter_sets": [[tiny["style"]], [{"uri": tiny["style"], "weight": 0.8}, tiny["subject"]]],
        "lora_scales": "0:1:0.5",
        "seeds": [1],
        "render": {"steps": 20, "height": 32, "width": 32},
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(spec))
    return str(path)


def report_cells(store: str, batch: str) -> tuple[str, dict]:
    html = open(os.path.join(store, "batches", batch, "report.html")).read()
    return html, json.load(open(os.path.join(store, "batches", batch, "report.json")))


def test_a_sweep_renders_its_grid_and_reports_numbers_from_the_videos(fleet_env, start_worker, sweep_spec):
    start_worker(fleet_env)
    first = lorafleet("sweep", sweep_spec, "--batch", "night1", env=fleet_env)
    assert first.returncode == 0, first.stdout + first.stderr
    # 12 cells, 10 renders: at lora_scale 0 both adapter sets are the base model, one key per prompt.
    assert "sweep night1: 12 cells, 10 enqueued" in first.stdout
    store = fleet_env["LORAFLEET_STORE_URL"]
    html, report = report_cells(store, "night1")
    cells = report["cells"]
    assert len(cells) == 12 and html.count("class='cell") == 12
    folder = os.path.join(store, "batches", "night1")
    for link in re.findall(r"href='([^']+\.mp4)'", html):
        assert decode_video(os.path.normpath(os.path.join(folder, link))).shape == (9, 32, 32, 3)
    assert os.path.getsize(os.path.join(folder, "plots", "set0.png")) > 0

    videos = {c["key"]: decode_video(os.path.join(store, "videos", f"{c['key']}.mp4")) for c in cells}
    for cell in cells:
        base = next(
            c for c in cells if (c["prompt"], c["seed"], c["lora_scale"]) == (cell["prompt"], cell["seed"], 0.0)
        )
        a, b = videos[cell["key"]].astype(np.float64), videos[base["key"]].astype(np.float64)
        mse = np.mean((a - b) ** 2)
        expected_psnr = None if mse == 0 else 10 * np.log10(255**2 / mse)
        numbers = cell["numbers"]
        assert (numbers["psnr_vs_base"] is None) == (expected_psnr is None)
        if expected_psnr is not None:
            assert numbers["psnr_vs_base"] == pytest.approx(expected_psnr)
        frames = videos[cell["key"]]
        assert numbers["temporal_ssim"] == pytest.approx(
            np.mean([ssim(f, g) for f, g in zip(frames[:-1], frames[1:], strict=True)])
        )
        assert numbers["render_s"] > 0
        if cell["lora_scale"] == 0:
            assert numbers["ssim_vs_base"] == pytest.approx(1.0)
    assert sum(report["switches"].values()) <= 6  # grouped: one switch per (adapter set, scale)

    again = lorafleet("sweep", sweep_spec, "--batch", "night2", "--compare", "night1", env=fleet_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "sweep night2: 12 cells, 0 enqueued, 12 already in the store" in again.stdout
    assert "(0 cells moved since night1)" in again.stdout


def test_a_bad_sweep_spec_names_the_place(fleet_env, tmp_path, tiny):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        f"prompts: [a cat]\nadapter_sets:\n  - [{tiny['style']}]\n  - [{{uri: {tiny['style']}, wieght: 0.8}}]\n"
        "  - [missing/adapter]\nlora_scales: [0, 1]\nseeds: [1]\n"
    )
    result = lorafleet("sweep", str(spec), env=fleet_env)
    assert result.returncode == 2
    assert 'adapter_sets[1][0]: unknown field "wieght" (did you mean "weight"?)' in result.stderr
    assert 'adapter_sets[2][0].uri: adapter "missing/adapter" not found' in result.stderr


def test_the_report_opens_in_a_real_browser_with_every_image(fleet_env, start_worker, sweep_spec, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make install` installs it (apt-get install chromium)")
        pytest.skip("no chromium here: `make install` as root installs it")
    start_worker(fleet_env)
    assert lorafleet("sweep", sweep_spec, "--batch", "browse", env=fleet_env).returncode == 0
    folder = os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "browse")
    # A copy of the report with a probe that writes what the browser loaded into the page.
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        "document.body.setAttribute('data-probe', JSON.stringify({cells: document.querySelectorAll('td.cell').length,"
        "images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length})); });</script>"
    )
    page = os.path.join(folder, "probe.html")
    with open(page, "w") as f:
        f.write(open(os.path.join(folder, "report.html")).read() + probe)
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom", f"file://{page}"],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    found = json.loads(re.search(r"data-probe=\"([^\"]+)\"", dom).group(1).replace("&quot;", '"'))
    assert found["cells"] == 12
    assert found["images"] == 12 + 2  # a poster per cell and a plot per adapter set
    assert found["loaded"] == found["images"]
