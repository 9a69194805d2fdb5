"""The main command end to end on the smoke preset: every stage runs, writes its grid,
TensorBoard summaries and metrics.json; a rerun restores everything from the caches; a
checkpoint from another config and a bad config key give clear errors."""

import glob
import json
import os
import subprocess
import sys

import pytest

from configs.digits import get_config
from helpers import fast_compiles
from softdimo_jax.pipelines import digits as train
from softdimo_jax.runtime.checkpointing import CheckpointMismatchError

ROW_KEYS = {"fd_digits", "accuracy", "precision", "recall", "reward"}
ALL_ROWS = {"teacher@1", "teacher@2", "dimo@1", "dimo_soft@1", "softdimo_gan@1", "gumbel_gan@1",
            "reward@1", "tteo_k2@1", "tteo_k4@1"}


def smoke_config():
    cfg = get_config("smoke")
    # One device keeps compile time down; the 8-device step is tested in test_trainer.py.
    cfg.mesh.num_devices = 1
    return cfg


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    # Unoptimised XLA code: the smoke sizes make compiling, not running, the cost. The
    # rerun below compiles the same way (it recomputes the one-step rows and compares them).
    with fast_compiles():
        metrics = train.train_and_evaluate(smoke_config(), workdir)
    return workdir, metrics


def test_smoke_pipeline_writes_everything(smoke_run):
    workdir, metrics = smoke_run
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    assert set(saved["rows"]) == ALL_ROWS
    for row in saved["rows"].values():
        assert ROW_KEYS <= set(row) and 0 <= row["accuracy"] <= 1
    assert saved["floor"]["fd_digits"] >= 0
    assert [s.name for s in train.STAGES] == [
        "tokenizer", "teacher", "classifier", "evaluate_teacher", "distill",
        "softdimo_gan", "gumbel_gan", "reward", "tteo"]
    for png in ("tokenizer/reconstructions.png", "teacher/samples_2steps.png",
                "classifier/test_images.png", "evaluate_teacher/teacher@1.png",
                "summary.png", "fd_vs_steps.png", "results.md"):
        assert os.path.getsize(os.path.join(workdir, png)) > 0, png
    for stage in ("tokenizer", "teacher", "classifier", "evaluate_teacher"):
        assert glob.glob(os.path.join(workdir, stage, "tb", "events.out.tfevents.*")), stage
    for stage in ("tokenizer", "teacher", "classifier"):
        assert os.path.isdir(os.path.join(workdir, stage, "checkpoints", "4")), stage
    # The EMA student is exported in the converted format the sample/evaluate CLIs load.
    from softdimo_jax.runtime.converted import load_converted

    student, student_params = load_converted(os.path.join(workdir, "distill", "student"))
    assert student.num_bits == smoke_config().tokenizer.model.num_bits


def test_rerun_restores_every_stage(smoke_run, capsys):
    workdir, first = smoke_run
    with fast_compiles():
        again = train.train_and_evaluate(smoke_config(), workdir)
    err = capsys.readouterr().err
    for stage in ("tokenizer", "teacher", "classifier"):
        assert f"[{stage}] complete at step 4" in err
    assert "[evaluate_teacher] cached rows" in err
    assert again["rows"] == first["rows"]


def test_checkpoint_from_another_config_is_a_clear_error(smoke_run):
    workdir, _ = smoke_run
    cfg = smoke_config()
    cfg.teacher.model.hidden_dim = 48
    with pytest.raises(CheckpointMismatchError, match=f"(?i)delete the stage directory {workdir}/teacher"):
        train.train_and_evaluate(cfg, workdir)


def test_bad_config_key_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "softdimo_jax.main", f"--workdir={tmp_path}",
         "--config.teacher.train.learning_rat=1"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode != 0
    assert "bad config override --config.teacher.train.learning_rat" in proc.stderr
    assert 'Did you mean "learning_rate"' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown digits preset"):
        get_config("huge")
