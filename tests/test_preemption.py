"""Preemption in one process: SIGTERM mid-run makes the Trainer save the current step and
raise Preempted (the main command exits 0); a rerun resumes there and ends exactly where an
uninterrupted run ends. (Several processes: tests/test_multiprocess.py.)"""

import os
import signal

import jax
import numpy as np
import pytest

from softdimo_jax.runtime.distributed import Preempted, PreemptionWatch
from test_trainer import make_trainer


def test_sigterm_saves_the_current_step_and_a_rerun_resumes_exactly(tmp_path):
    full = make_trainer(None, num_steps=9).run()

    def term(step, state):
        if step == 5:  # not on the checkpoint cadence (every 2 steps)
            os.kill(os.getpid(), signal.SIGTERM)

    stage = str(tmp_path / "stage")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as e:
        make_trainer(stage, num_steps=9, on_step_end=term).run()
    assert e.value.step == 5 and "rerun the same command" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only held while training
    assert sorted(int(d) for d in os.listdir(os.path.join(stage, "checkpoints")) if d.isdigit())[-1] == 5

    resumed = make_trainer(stage, num_steps=9).run()
    assert resumed.resumed_from == 5
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_watch_without_a_signal_never_asks():
    with PreemptionWatch() as w:
        assert not any(w.requested(s) for s in range(3))
