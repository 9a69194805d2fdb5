"""Training-loop machinery shared by every phase (tokenizer, teacher, classifier,
distillation, GAN, reward).

A phase hands the `Trainer` three pure pieces and the Trainer does everything else:

    init_fn(rng, *init_args) -> state
        Any pytree of arrays (params, optimiser state, EMA, second model, ...). Built once
        abstractly with `jax.eval_shape`, then materialised by `jax.jit(init_fn,
        out_shardings=...)` directly in its sharded layout (no host copy of a big model).
        `init_args` (e.g. a teacher's params, the previous phase's state) are jit
        arguments, never constants baked into the program.
    step_fn(state, batch, rng, step, frozen) -> (state, metrics)
        One jitted update. `rng` is already `jax.random.fold_in(seed_key, step)`, so a
        step's randomness depends only on the step number (exact resume). `frozen` is a
        pytree of models that do not train (a teacher, a tokenizer, a reward network):
        passed explicitly, sharded like params, never donated, never checkpointed here.
        `metrics` is a dict of scalars and must hold "loss" (checked for NaN/inf).
        The old `state` is donated: its buffers are reused for the new one.
    batch_fn(step) -> batch
        This process's rows of the global batch for `step`, as host arrays with the batch
        axis first (see `softdimo_jax.data`). Must be a pure function of the step number:
        that, with the folded RNG, makes a resumed run bit-identical to an uninterrupted one.

What the Trainer owns:
- a ("data", "fsdp") mesh (`softdimo_jax.runtime.mesh.make_mesh`): the batch is split over
  all devices; with FSDP the large arrays of the state are split along "fsdp" too;
  per-process host batches become global arrays with
  `jax.make_array_from_process_local_data` (multi-host ready);
- an orbax `CheckpointManager` in `<stage_dir>/checkpoints`: atomic saves (orbax writes to
  a temporary directory and renames), asynchronous writing, keep-last-N, restore into the
  sharded abstract state; a checkpoint whose tree/shapes differ from this config's state
  raises `CheckpointMismatchError` naming the directory to delete;
- clu metric writers (TensorBoard, `<stage_dir>/tb`); only process 0 writes;
- the non-finite guard: metrics are pulled to the host at every log and before every save;
  a NaN/inf loss stops the run with `NonFiniteLossError` naming the step, and no checkpoint
  is written after the last finite step (the last good one stays on disk). The state
  itself is checked too, before every save and before a run reports itself complete: a
  non-finite floating array, or one whose magnitude passed `max_abs_state` (a learning
  rate that blew up), stops the run the same way — nothing bad is ever saved;
- a full disk while saving is one line naming the checkpoint directory and the state's size;
- progress lines with rate and ETA;
- `wait_until_finished()` before returning, so no save is lost at exit;
- preemption: on SIGTERM every process saves the state at the current step and `run()`
  raises `Preempted` (the commands exit 0; a rerun resumes there).

A run is "complete" when the latest checkpoint's step equals `num_steps`: `run()` then only
restores (this is how the main command skips cached stages).

This is the one place where training steps are jitted (`jit_train_step`): every phase,
and the benchmarks, compile the step through it, with the same shardings, donation and
XLA compiler options. The runtime knows nothing of the method: phases hand it functions.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.runtime import checkpointing
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime import artifacts
from softdimo_jax.runtime.artifacts import log
from softdimo_jax.runtime.checkpointing import CheckpointMismatchError
from softdimo_jax.runtime.errors import BadInput, RunFailure
from softdimo_jax.runtime.distributed import Preempted, PreemptionWatch


class NonFiniteLossError(RunFailure):
    """The loss or the state became NaN / inf / exploding; the last good checkpoint is kept."""


# Beyond this a trained array has blown up (weights live near 1, Adam's second moments
# near gradient², far below); a diverged learning rate gives 1e29-1e38.
MAX_ABS_STATE = 1e12


@dataclasses.dataclass
class TrainResult:
    state: Any
    step: int
    history: list[dict[str, float]]  # logged (averaged) metrics, one dict per log interval
    resumed_from: int | None  # step restored at start, None for a fresh run
    trained: bool  # False when the run was already complete and only restored


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def cpu_memory_compiler_options() -> dict:
    """XLA:CPU options that trade step speed for peak memory (empty off CPU):
    the memory-optimised scheduler (~20% fewer temporaries on the S distillation step,
    ~10% slower on S and ~30% on T: less overlap of independent ops), and one LLVM module
    for the whole step instead of several compiled side by side (~100 MB lower peak while
    compiling, no slower to compile on 2 cores)."""
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
            "xla_cpu_parallel_codegen_split_count": 1}


def jit_train_step(step_fn: Callable, *, base_rng, state_shardings, mesh,
                   compiler_options: dict | None = None):
    """The jitted update `(state, batch, step, frozen) -> (state, metrics)` of the Trainer
    contract: rng = fold_in(base_rng, step), state donated (batch and frozen are not),
    state out in `state_shardings`, metrics replicated."""
    def wrapped(state, batch, step, frozen):
        return step_fn(state, batch, jax.random.fold_in(base_rng, step), step, frozen)

    return jax.jit(wrapped, out_shardings=(state_shardings, meshlib.replicated(mesh)),
                   donate_argnums=(0,), compiler_options=compiler_options)


class Trainer:
    """Runs one phase; see the module docstring for the contract.

    Args:
      name: stage name (logs, error messages).
      stage_dir: where `checkpoints/` and `tb/` go; None disables both (tests).
      init_fn, step_fn, batch_fn: the phase (module docstring).
      num_steps: total steps of the run.
      seed: base RNG seed; step s uses fold_in(PRNGKey(seed), s).
      mesh: a ("data", "fsdp") mesh (default: all devices, data parallel).
      fsdp: shard large state arrays along the mesh's "fsdp" axis.
      frozen: pytree of non-trained arrays given to every step (placed on the mesh here).
      checkpoint_every, keep: save cadence and how many checkpoints to keep.
      log_every: metrics cadence (host sync + NaN check + TensorBoard + progress line).
      config_json: a JSON-able description stored with each checkpoint; on resume a
        different stored value is reported in the mismatch error.
      on_step_end: optional callback(step, state) after each host step (tests use it to
        simulate a kill).
      init_args: extra jit arguments of init_fn (see the module docstring).
      compiler_options: XLA compiler options of the jitted step (e.g. the memory-optimised
        XLA:CPU schedule the distillation benchmark measures).
      max_abs_state: the largest magnitude a floating array of the state may hold before
        the run counts as diverged (see the module docstring).
    """

    def __init__(
        self,
        name: str,
        stage_dir: str | None,
        init_fn: Callable,
        step_fn: Callable,
        batch_fn: Callable[[int], Any],
        num_steps: int,
        seed: int = 0,
        mesh=None,
        fsdp: bool = False,
        frozen: Any = None,
        checkpoint_every: int = 1000,
        keep: int = 2,
        log_every: int = 100,
        config_json: Any = None,
        on_step_end: Callable | None = None,
        async_checkpointing: bool = True,
        init_args: tuple = (),
        compiler_options: dict | None = None,
        max_abs_state: float = MAX_ABS_STATE,
    ):
        self.name = name
        self.stage_dir = stage_dir
        self.init_fn = init_fn
        self.step_fn = step_fn
        self.batch_fn = batch_fn
        self.num_steps = int(num_steps)
        self.seed = int(seed)
        self.mesh = meshlib.as_auto_mesh(mesh if mesh is not None else meshlib.make_mesh())
        self.fsdp = bool(fsdp)
        self.checkpoint_every = max(int(checkpoint_every), 1)
        self.log_every = max(int(log_every), 1)
        self.config_json = config_json
        self.on_step_end = on_step_end

        self.init_args = tuple(init_args)
        self.compiler_options = compiler_options
        self.max_abs_state = float(max_abs_state)
        self._state_stats = None
        self.state_shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(self.seed), *self.init_args)
        self.state_shardings = meshlib.params_shardings(self.mesh, self.state_shapes, self.fsdp)
        self.frozen = self._place(frozen)
        self._jit_step = None

        self.writer = None
        self.checkpoint_dir = None if stage_dir is None else checkpointing.checkpoint_dir(stage_dir)
        self._keep = keep
        self._async = async_checkpointing
        self._manager = None

    @property
    def manager(self):
        """The stage's orbax CheckpointManager, opened on first use (None without stage_dir)."""
        if self._manager is None and self.stage_dir is not None:
            self._manager = checkpointing.open_manager(self.stage_dir, self._keep, self._async)
        return self._manager

    # ----------------------------------------------------------------- placement
    def _place(self, tree):
        """Puts a host/device pytree on the mesh with the params sharding rule (abstract
        leaves get the sharding attached: the AOT tool builds Trainers without arrays)."""
        if tree is None:
            return None
        return meshlib.place(tree, meshlib.params_shardings(self.mesh, tree, self.fsdp))

    def global_batch(self, local_batch):
        """Process-local host batch -> global arrays sharded over the batch axis."""

        def one(x):
            x = np.asarray(x)
            sharding = meshlib.batch_sharding(self.mesh, x.ndim)
            global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
            if global_shape[0] % self.mesh.size:
                raise BadInput(
                    f"[{self.name}] global batch {global_shape[0]} is not divisible by the "
                    f"{self.mesh.size} devices of the mesh — choose a multiple of {self.mesh.size}"
                )
            return jax.make_array_from_process_local_data(sharding, x, global_shape)

        return jax.tree.map(one, local_batch)

    # ----------------------------------------------------------------- state
    def init_state(self):
        init = jax.jit(self.init_fn, out_shardings=self.state_shardings)
        return init(jax.random.PRNGKey(self.seed), *self.init_args)

    def abstract_state(self):
        return meshlib.abstract_with_shardings(self.state_shapes, self.state_shardings)

    def compiled_step(self):
        """The jitted step (`jit_train_step`), built once."""
        if self._jit_step is None:
            self._jit_step = jit_train_step(
                self.step_fn, base_rng=jax.random.PRNGKey(self.seed), state_shardings=self.state_shardings,
                mesh=self.mesh, compiler_options=self.compiler_options)
        return self._jit_step

    def step(self, state, step: int):
        """One update at `step` (host batch fetched, sharded, jitted step run)."""
        batch = self.global_batch(self.batch_fn(step))
        return self.compiled_step()(state, batch, jnp.asarray(step, jnp.int32), self.frozen)

    # ----------------------------------------------------------------- checkpoints
    def latest_step(self) -> int | None:
        return None if self.manager is None else self.manager.latest_step()

    def is_complete(self) -> bool:
        latest = self.latest_step()
        return latest is not None and latest >= self.num_steps

    def restore(self, step: int | None = None):
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"[{self.name}] no checkpoint in {self.checkpoint_dir}")
        return checkpointing.restore(
            self.manager, step, self.abstract_state(), self.stage_dir, self.name, self.config_json
        )

    def _identity_ok(self, step: int) -> bool:
        """The stored identity matches (or the run extends): True. A stale checkpoint is
        refused (StaleStageError), or with --retrain_stale removed: False."""
        meta = checkpointing.read_meta(self.manager, step)
        try:
            changed = checkpointing.check_identity(meta, self.config_json, self.num_steps, self.stage_dir, self.name)
            if changed:
                log(f"[{self.name}] warning: continuing the unfinished run at step {step} with changed "
                    f"settings: {'; '.join(changed[:6])}")
            return True
        except checkpointing.StaleStageError as e:
            if not checkpointing.RETRAIN_STALE["enabled"] or artifacts.is_remote(self.checkpoint_dir):
                raise
            log(f"[{self.name}] retraining: {e}")
            self._manager.close()
            self._manager = None
            shutil.rmtree(self.checkpoint_dir)
            return False

    def check_state(self, state, step: int, last_good_saved: int | None) -> None:
        """Raises NonFiniteLossError if a floating array of `state` is non-finite or beyond
        `max_abs_state` (one jitted reduction; the arrays stay on device)."""
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        named = [(jax.tree_util.keystr(p), x) for p, x in flat
                 if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.size]
        if not named:
            return
        if self._state_stats is None:
            self._state_stats = jax.jit(lambda xs: jnp.stack(
                [jnp.where(jnp.all(jnp.isfinite(x)), jnp.max(jnp.abs(x.astype(jnp.float32))), jnp.inf) for x in xs]))
        peaks = np.asarray(jax.device_get(self._state_stats([x for _, x in named])))
        bad = [(n, float(v)) for (n, _), v in zip(named, peaks) if not v <= self.max_abs_state]
        if not bad:
            return
        shown = ", ".join(f"{n} (max |x| {v:.3g})" for n, v in bad[:3])
        raise NonFiniteLossError(
            f"[{self.name}] the state diverged by step {step}: {len(bad)} arrays are non-finite or beyond "
            f"{self.max_abs_state:.0e}, e.g. {shown}; stopped without saving it; {self._kept(last_good_saved)} — "
            "lower the learning rate (or check the inputs), then rerun to resume from that checkpoint")

    def _kept(self, last_good_saved: int | None) -> str:
        if last_good_saved is not None and self.manager is not None:
            return f"the last good checkpoint (step {last_good_saved}) is kept in {self.checkpoint_dir}"
        return "no checkpoint was written"

    def save(self, step: int, state) -> None:
        if self.manager is None:
            return
        meta = {"step": int(step), "stage": self.name, "config": self.config_json, "num_steps": self.num_steps}
        try:
            checkpointing.save(self.manager, step, state, meta)
        except Exception as e:
            checkpointing.raise_if_disk_full(e, self.checkpoint_dir, state)
            raise

    # ----------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        start = 0
        resumed = None
        latest = self.latest_step()
        if latest is not None and not self._identity_ok(latest):
            latest = None  # retrained: the stale checkpoints were removed
        if latest is not None:
            state = self.restore(latest)
            start = resumed = int(latest)
            if start >= self.num_steps:
                log(f"[{self.name}] complete at step {start}: restored from {self.checkpoint_dir}")
                self.close()
                return TrainResult(state, start, [], resumed, trained=False)
            log(f"[{self.name}] resuming from step {start}/{self.num_steps}")
        else:
            state = self.init_state()

        if self.stage_dir is not None and self.writer is None:
            self.writer = artifacts.writer(self.stage_dir)

        history: list[dict[str, float]] = []
        pending: list[tuple[int, dict]] = []  # device metrics not yet checked
        last_good_saved = resumed
        t0 = time.time()
        t_first = None  # time after the first (compiling) step, for a fair ETA
        step_first = None
        preemption = PreemptionWatch().start()  # SIGTERM: save this step, then stop
        try:
            for step in range(start, self.num_steps):
                state, metrics = self.step(state, step)
                pending.append((step, metrics))
                done = step + 1
                if t_first is None:
                    jax.block_until_ready(metrics)
                    t_first, step_first = time.time(), done
                    log(f"[{self.name}] first step (compile + run) took {format_seconds(t_first - t0)}")
                if self.on_step_end is not None:
                    self.on_step_end(done, state)
                is_last = done == self.num_steps
                want_save = self.manager is not None and (done % self.checkpoint_every == 0 or is_last)
                if done % self.log_every == 0 or want_save or is_last:
                    host = self._check_pending(pending, last_good_saved)
                    pending = []
                    avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                    avg["step"] = done
                    history.append(avg)
                    now = time.time()
                    rate = (done - step_first) / (now - t_first) if done > step_first else float("nan")
                    eta = (self.num_steps - done) / rate if rate and rate > 0 else float("nan")
                    if self.writer is not None:
                        self.writer.write_scalars(done, {k: v for k, v in avg.items() if k != "step"})
                        if math.isfinite(rate):
                            self.writer.write_scalars(done, {"steps_per_sec": rate})
                    shown = " ".join(f"{k}={v:.4g}" for k, v in avg.items() if k != "step")
                    log(
                        f"[{self.name}] step {done}/{self.num_steps} {shown} "
                        f"({rate:.1f} it/s, ETA {format_seconds(eta)})"
                    )
                if want_save or is_last:
                    # Never save, nor report complete, a state that diverged.
                    self.check_state(state, done, last_good_saved)
                if want_save:
                    self.save(done, state)
                    last_good_saved = done
                if preemption.requested(done):  # every process, every step (a collective protocol)
                    if last_good_saved != done:
                        self._check_pending(pending, last_good_saved)
                        self.save(done, state)
                    raise Preempted(self.name, done, self.checkpoint_dir)
        finally:
            preemption.stop()
            # Waits for the last asynchronous save, then releases orbax's threads.
            self.close()
        return TrainResult(state, self.num_steps, history, resumed, trained=True)

    def _check_pending(self, pending, last_good_saved):
        host = [(s, {k: np.asarray(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        for s, m in host:
            if "loss" not in m:
                raise KeyError(f"[{self.name}] step_fn must return a 'loss' metric; got {sorted(m)}")
            bad = [k for k, v in m.items() if not np.all(np.isfinite(v))]
            if bad:
                raise NonFiniteLossError(
                    f"[{self.name}] non-finite {', '.join(bad)} at step {s + 1} "
                    f"(loss={float(m['loss'])}); stopped; {self._kept(last_good_saved)} — lower the "
                    "learning rate or check the inputs, then rerun to resume from that checkpoint"
                )
        return [m for _, m in host]

    def close(self) -> None:
        if self._manager is not None:
            try:
                self._manager.wait_until_finished()  # an asynchronous save's error lands here
            except Exception as e:
                checkpointing.raise_if_disk_full(e, self.checkpoint_dir, self.state_shapes)
                raise
            finally:
                self._manager.close()
                self._manager = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "CheckpointMismatchError", "Preempted",
           "jit_train_step", "format_seconds"]
