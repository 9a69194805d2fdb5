"""The report of a run (summary.png, fd_vs_steps.png, results.md) from a metrics.json and
grids made here; missing rows and grids give a report of what exists."""

import json
import os

import numpy as np
from PIL import Image

from softdimo_jax import report as report_cli
from softdimo_jax.pipelines.report import write_report
from softdimo_jax.runtime.artifacts import save_image_grid

ROW = {"fd_digits": 9.5, "accuracy": 0.99, "precision": 0.97, "recall": 0.46, "reward": -0.03}
GRIDS = {"teacher@1": "evaluate_teacher/teacher@1.png", "teacher@2": "evaluate_teacher/teacher@2.png",
         "teacher@16": "evaluate_teacher/teacher@16.png", "dimo@1": "distill/dimo_at1.png",
         "softdimo_gan@1": "softdimo_gan/softdimo_gan_at1.png", "reward@1": "reward/reward_at1.png",
         "tteo_k2@1": "tteo/tteo_k2_at1.png", "tteo_k4@1": "tteo/tteo_k4_at1.png"}


def _workdir(tmp_path, rows, grids):
    with open(tmp_path / "metrics.json", "w") as f:
        json.dump({"floor": {"fd_digits": 3.0}, "rows": {r: dict(ROW, fd_digits=ROW["fd_digits"] + i)
                                                         for i, r in enumerate(rows)}}, f)
    rng = np.random.default_rng(0)
    for r in grids:
        save_image_grid(rng.uniform(size=(100, 16, 16, 1)), tmp_path / GRIDS[r], nrow=10)  # 182 px wide
    return str(tmp_path)


def _size(path):
    with Image.open(path) as im:
        return im.size


def test_full_report(tmp_path):
    workdir = _workdir(tmp_path, list(GRIDS), list(GRIDS))
    written = write_report(workdir, tensorboard=False)
    assert [os.path.basename(p) for p in written] == ["summary.png", "fd_vs_steps.png", "results.md"]
    # Six panels (teacher 1 and 16 steps, Di[M]O, + GAN, + reward, + TTEO K=4) in 3 columns;
    # each 182 px grid of 16 px digits upscaled 3x (48 px digits) under a 56 px title.
    assert _size(tmp_path / "summary.png") == (3 * 546, 2 * (546 + 56))
    w, h = _size(tmp_path / "fd_vs_steps.png")
    assert w > 1000 and h > 300
    md = (tmp_path / "results.md").read_text()
    assert "![summary](summary.png)" in md and "![fd_vs_steps](fd_vs_steps.png)" in md
    for row, grid in GRIDS.items():
        assert f"| {row} |" in md and f"[grid]({grid})" in md
    assert "| floor (train vs test) | 3.00 |" in md


def test_missing_rows_and_grids_report_what_exists(tmp_path):
    workdir = _workdir(tmp_path, ["teacher@1", "teacher@2", "dimo@1"], ["teacher@1", "teacher@2"])
    write_report(workdir, tensorboard=False)
    assert _size(tmp_path / "summary.png") == (2 * 546, 546 + 56)  # teacher 1 and 2 steps; no Di[M]O grid
    md = (tmp_path / "results.md").read_text()
    assert "| dimo@1 |" in md and "distill/dimo_at1.png" not in md
    assert (tmp_path / "fd_vs_steps.png").exists()


def test_at_scale_workdir_without_metrics(tmp_path):
    save_image_grid(np.zeros((4, 64, 64, 3)), tmp_path / "distill" / "student_hard.png")  # 2x2 grid, 134 px
    written = write_report(str(tmp_path), tensorboard=False)
    assert [os.path.basename(p) for p in written] == ["summary.png", "results.md"]
    assert _size(tmp_path / "summary.png") == (134, 134 + 56)  # real-size images are not upscaled


def test_cli(tmp_path, capsys):
    assert report_cli.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("report: ") and "not a directory" in err[0] and " — " in err[0]
    workdir = _workdir(tmp_path, ["teacher@1"], ["teacher@1"])
    assert report_cli.main([workdir]) == 0  # with the TensorBoard images
    assert "summary.png" in capsys.readouterr().out
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
