"""A sweep report's plots: each number against lora_scale, per section (matplotlib, drawn off-screen)."""

import io
import statistics

import numpy as np

from producer.report.cells import ReportCell
from producer.report.rules import METRICS

PSNR_CEILING = 60.0  # where the plots draw scale 0's infinite PSNR


def short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def plot(cells: list[ReportCell], set_index: int) -> bytes:
    """Each number against lora_scale: a line per prompt × seed (the prompt in the legend), the mean
    in black; scale 0's infinite PSNR drawn at the ceiling and said so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in METRICS if any(name in c.numbers for c in cells)]
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), constrained_layout=True)
    rows = sorted({(c.prompt, c.seed) for c in cells})
    scales = sorted({c.lora_scale for c in cells})
    for axis, name in zip(np.atleast_1d(axes), names, strict=True):

        def value(cell, name=name):
            number = cell.numbers.get(name)
            return PSNR_CEILING if name == "psnr_vs_base" and number is None else number

        for prompt, seed in rows:
            row = sorted((c for c in cells if (c.prompt, c.seed) == (prompt, seed)), key=lambda c: c.lora_scale)
            points = [(c.lora_scale, value(c)) for c in row if value(c) is not None]
            text = short(row[0].prompt_text, 32)
            axis.plot(*zip(*points, strict=True), marker="o", alpha=0.6, label=f"{text} (seed {seed})")
        means = [
            (s, statistics.fmean(v))
            for s in scales
            if (v := [value(c) for c in cells if c.lora_scale == s and value(c) is not None])
        ]
        axis.plot(*zip(*means, strict=True), color="black", linewidth=2.5, label="mean")
        axis.set_xlabel("lora_scale")
        axis.set_title(METRICS[name][0], fontsize=10)
        if name == "psnr_vs_base":
            axis.annotate(f"scale 0: ∞ (identical),\ndrawn at {PSNR_CEILING:g} dB", (0, PSNR_CEILING), fontsize=7,
                          xytext=(6, -22), textcoords="offset points")  # fmt: skip
    np.atleast_1d(axes)[0].legend(fontsize=6)
    figure.suptitle(f"adapter set {set_index}", fontsize=11)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=80)
    plt.close(figure)
    return out.getvalue()
