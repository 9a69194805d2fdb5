"""The result at a glance, written at the end of a run (and by `python -m softdimo_jax.report
WORKDIR` over any finished or partial workdir):

- `<workdir>/summary.png`: labelled sample panels side by side (teacher at its fewest and
  most steps, Di[M]O one-step, + GAN, + reward, + TTEO), each digit upscaled (nearest) to
  at least 48 pixels, titled with the row's FD-digits and accuracy; the grids every stage
  already wrote, so the labels (class i % 10 at position i) are the same in every panel;
- `<workdir>/fd_vs_steps.png`: FD-digits, accuracy and reward against sampling steps (log
  scale): the teacher's curve, the one-step rows as labelled points at 1 step, the floor;
- `<workdir>/results.md`: the metrics table with links to the images;
- the same two figures as TensorBoard images in `<workdir>/tb`.
A workdir with missing rows or grids gives a report of what exists. For the at-scale
pipelines (no metric rows) the panels are their one-step grids.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from softdimo_jax.runtime import artifacts

MIN_DIGIT_PX = 48  # every sample in summary.png is at least this many pixels wide
DIGITS_GRID_NROW = 10  # the digits stages write grids of 10 images per row (2 px padding)
GRID_PADDING = 2
TITLE_PX = 56  # room above each panel for its two-line title
DPI = 100


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    path: str  # the grid PNG, relative to the workdir
    row: str | None = None  # the metrics row it shows (None: no metrics, e.g. at scale)
    nrow: int | None = DIGITS_GRID_NROW  # images per grid row, to find the image size


def _teacher_steps(rows: dict) -> list[int]:
    return sorted(int(m.group(1)) for m in (re.fullmatch(r"teacher@(\d+)", r) for r in rows) if m)


def digits_panels(rows: dict) -> list[Panel]:
    """The digits pipeline's panels, in the order of the method."""
    steps = _teacher_steps(rows)
    panels = []
    if steps:
        lo, hi = steps[0], steps[-1]
        for k in dict.fromkeys((lo, hi)):
            panels.append(Panel(f"teacher, {k} step{'s' if k > 1 else ''}", f"evaluate_teacher/teacher@{k}.png",
                                f"teacher@{k}"))
    panels += [
        Panel("Di[M]O, 1 step", "distill/dimo_at1.png", "dimo@1"),
        Panel("Soft-Di[M]O + GAN", "softdimo_gan/softdimo_gan_at1.png", "softdimo_gan@1"),
        Panel("+ reward", "reward/reward_at1.png", "reward@1"),
    ]
    tteo = sorted((r for r in rows if re.fullmatch(r"tteo_k\d+@1", r)), key=lambda r: int(r[6:-2]))
    if tteo:
        k = tteo[-1][6:-2]
        panels.append(Panel(f"+ TTEO (K = {k})", f"tteo/tteo_k{k}_at1.png", tteo[-1]))
    return panels


AT_SCALE_PANELS = [
    Panel("Di[M]O student, hard tokens", "distill/student_hard.png", nrow=None),
    Panel("Di[M]O student, soft decode", "distill/student_soft.png", nrow=None),
    Panel("+ reward", "reward/student_hard.png", nrow=None),
]


def _upscale(grid: np.ndarray, nrow: int | None) -> np.ndarray:
    """Nearest-neighbour upscaling so one image of the grid is at least MIN_DIGIT_PX wide."""
    if nrow is None:
        return grid
    cell = (grid.shape[1] - GRID_PADDING) / nrow - GRID_PADDING
    scale = max(1, math.ceil(MIN_DIGIT_PX / cell)) if cell > 0 else 1
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def _title(panel: Panel, rows: dict) -> str:
    row = rows.get(panel.row) if panel.row else None
    if not row:
        return panel.title
    return f"{panel.title}\nFD-digits {row['fd_digits']:.2f} · accuracy {row['accuracy']:.3f}"


def _save(fig: Figure, path: str) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)


def summary_figure(workdir: str, panels: list[Panel], rows: dict, cols: int = 3) -> Figure | None:
    """Panels side by side (at most `cols` per line), each at 1 figure pixel per image pixel.
    None when no panel's grid exists."""
    found = [(p, _upscale(np.asarray(Image.open(os.path.join(workdir, p.path)).convert("RGB")), p.nrow))
             for p in panels if os.path.exists(os.path.join(workdir, p.path))]
    if not found:
        return None
    cols = min(cols, len(found))
    lines = math.ceil(len(found) / cols)
    cell_w = max(img.shape[1] for _, img in found)
    cell_h = max(img.shape[0] for _, img in found) + TITLE_PX
    width, height = cols * cell_w, lines * cell_h
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    for i, (panel, img) in enumerate(found):
        line, col = divmod(i, cols)
        h, w = img.shape[:2]
        x0 = col * cell_w + (cell_w - w) / 2
        y0 = height - line * cell_h - TITLE_PX - h  # figure coordinates start at the bottom
        ax = fig.add_axes((x0 / width, y0 / height, w / width, h / height))
        ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(_title(panel, rows), fontsize=11)
    return fig


def steps_figure(rows: dict, floor: dict | None) -> Figure | None:
    """FD-digits, accuracy and reward against sampling steps; None without teacher rows or
    one-step rows."""
    steps = _teacher_steps(rows)
    one_step = [r for r in rows if r.endswith("@1") and not r.startswith("teacher@")]
    if not steps and not one_step:
        return None
    metrics = [("fd_digits", "FD-digits (lower is better)"), ("accuracy", "accuracy"), ("reward", "reward")]
    metrics = [(m, label) for m, label in metrics if any(m in row for row in rows.values())]
    fig = Figure(figsize=(4.6 * len(metrics) + 2.2, 4.2), dpi=DPI, facecolor="white")
    for j, (m, label) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        ks = [k for k in steps if m in rows[f"teacher@{k}"]]
        if ks:
            ax.plot(ks, [rows[f"teacher@{k}"][m] for k in ks], "o-", color="tab:blue", label="teacher (multi-step)")
        pts = [r for r in one_step if m in rows[r]]
        for i, r in enumerate(pts):
            x = 2 ** (0.1 * (i - (len(pts) - 1) / 2))  # spread around 1 step (log axis)
            ax.plot([x], [rows[r][m]], "s", color=f"C{(i + 1) % 10}", label=f"{r} (one step)")
        if m == "fd_digits" and floor and "fd_digits" in floor:
            ax.axhline(floor["fd_digits"], color="gray", ls="--", label="floor (train vs test)")
        ax.set_xscale("log", base=2)
        ticks = sorted(set(ks) | {1})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("sampling steps")
        ax.set_title(label, fontsize=11)
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / (4.6 * len(metrics) + 2.2), 1))
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    return fig


def row_grid(workdir: str, row: str) -> str | None:
    """The grid PNG a stage wrote for metrics row `row` (relative to workdir), if any:
    `<stage>/<row>.png` for teacher rows, `<stage>/<row with @ -> _at>.png` for the others."""
    names = {f"{row}.png", f"{row.replace('@', '_at')}.png"}
    for stage in sorted(os.listdir(workdir)):
        for name in names:
            if os.path.isfile(os.path.join(workdir, stage, name)):
                return f"{stage}/{name}"
    return None


def results_markdown(rows: dict, floor: dict | None, images: list[str], workdir: str) -> str:
    """The metrics table as Markdown, with links to the figures and every row's grid."""
    grid_of = {name: row_grid(workdir, name) for name in rows}
    cols = ["fd_digits", "accuracy", "precision", "recall", "reward"]
    out = ["# Results", ""]
    out += [f"![{os.path.splitext(name)[0]}]({name})" for name in images]
    out += ["", "| row | " + " | ".join(cols) + " | samples |", "|---|" + "---|" * (len(cols) + 1)]
    if floor and "fd_digits" in floor:
        out.append(f"| floor (train vs test) | {floor['fd_digits']:.2f} |" + " |" * len(cols))
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), (int, float)) else "" for c in cols]
        link = f"[grid]({grid_of[name]})" if name in grid_of else ""
        out.append(f"| {name} | " + " | ".join(cells) + f" | {link} |")
    return "\n".join(out) + "\n"


def write_report(workdir: str, tensorboard: bool = True) -> list[str]:
    """Writes summary.png, fd_vs_steps.png and results.md (and the figures to TensorBoard)
    from what `workdir` holds; returns the paths written. Process 0 only."""
    if not artifacts.is_lead():
        return []
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir} is not a directory; pass the --workdir of a run")
    metrics_path = os.path.join(workdir, "metrics.json")
    metrics = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    rows, floor = metrics.get("rows", {}), metrics.get("floor") or None
    panels = digits_panels(rows) if rows else AT_SCALE_PANELS
    figures = {"summary.png": summary_figure(workdir, panels, rows), "fd_vs_steps.png": steps_figure(rows, floor)}
    written = []
    for name, fig in figures.items():
        if fig is not None:
            _save(fig, os.path.join(workdir, name))
            written.append(os.path.join(workdir, name))
    images = [os.path.basename(p) for p in written]
    md = os.path.join(workdir, "results.md")
    with open(md, "w") as f:
        f.write(results_markdown(rows, floor, images, workdir))
    written.append(md)
    if tensorboard and images:
        writer = artifacts.writer(workdir)
        writer.write_images(0, {os.path.splitext(n)[0]: np.asarray(Image.open(os.path.join(workdir, n)).convert("RGB"),
                                                                    np.float32)[None] / 255.0 for n in images})
        writer.close()
    return written
