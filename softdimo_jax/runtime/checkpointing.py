"""Orbax checkpoints of one stage: `<stage_dir>/checkpoints/<step>/{state,meta}`.

`state` is the phase's whole pytree (params, optimiser state, EMA, ...), `meta` a small
JSON record (step, stage name, the config that made it). Saves are atomic (orbax writes
into a temporary directory and renames it when complete), asynchronous, keep-last-N.

Restores go into an abstract target that carries shardings, so arrays land directly in
their (possibly FSDP-sharded) layout. Before restoring, the stored tree and shapes are
compared with the target: a checkpoint from another config raises
`CheckpointMismatchError` naming the stage directory to delete, instead of an orbax or
tensorstore traceback.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import jax
import numpy as np

from softdimo_jax.runtime.artifacts import is_remote
from softdimo_jax.runtime.errors import BadInput, RunFailure


class MissingCheckpointError(BadInput, FileNotFoundError):
    """A stage's checkpoint that a later stage or command needs is not there."""


class CheckpointMismatchError(BadInput):
    """A checkpoint on disk was made by a different config (model size, optimiser...)."""


def checkpoint_dir(stage_dir: str) -> str:
    path = os.path.join(stage_dir, "checkpoints")
    return path if is_remote(path) else os.path.abspath(path)  # abspath would mangle gs://


def orbax():
    """orbax.checkpoint, imported on first use: importing it adds ~40 MB of resident memory,
    which runs that never save (the distillation benchmark, Trainers without a stage
    directory) should not carry."""
    import orbax.checkpoint as ocp

    return ocp


def open_manager(stage_dir: str, keep: int = 2, async_save: bool = True) -> "orbax.checkpoint.CheckpointManager":
    ocp = orbax()
    return ocp.CheckpointManager(
        checkpoint_dir(stage_dir),
        # Handlers named up front so a fresh manager can read metadata before any save.
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1), create=True, enable_async_checkpointing=async_save
        ),
    )


def save(manager: "orbax.checkpoint.CheckpointManager", step: int, state: Any, meta: dict) -> None:
    ocp = orbax()
    manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT anywhere in an exception's chain (orbax wraps its threads' errors)."""
    for _ in range(10):
        if e is None:
            return False
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def raise_if_disk_full(e: BaseException, directory: str | None, state: Any) -> None:
    """A full disk as one line: where, and how much the state needs (orbax writes to a
    temporary directory, so nothing half-written is taken as a checkpoint)."""
    if not is_disk_full(e):
        return
    nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(state) if hasattr(x, "shape") and hasattr(x, "dtype"))
    raise RunFailure(f"no space left on the device of {directory}: a checkpoint needs about "
                     f"{nbytes / 2**20:.0f} MiB — free space there (or use another --workdir) and rerun; "
                     "the run resumes from its last complete checkpoint") from e


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def shape_table(tree) -> dict[str, tuple[int, ...]]:
    """'a/b/0/c' -> shape. Path entries are normalised (dict key, attribute, index) because
    orbax stores namedtuples (optax states) as dicts/lists in its metadata tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(e) for e in path): tuple(leaf.shape) for path, leaf in flat}


def read_meta(manager: "orbax.checkpoint.CheckpointManager", step: int) -> dict | None:
    ocp = orbax()
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # older/foreign checkpoints without meta: the shape check still runs
        return None


def check_compatible(manager, step: int, target_shapes, stage_dir: str, name: str,
                     config_json: Any = None) -> None:
    """Raises CheckpointMismatchError if the stored state tree/shapes differ from the target."""
    try:
        stored_tree = manager.item_metadata(step)["state"].tree
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointMismatchError(
            f"[{name}] cannot read the checkpoint metadata at step {step} in "
            f"{checkpoint_dir(stage_dir)} ({e}); delete the stage directory "
            f"{os.path.abspath(stage_dir)} to retrain this stage."
        ) from e
    want, have = shape_table(target_shapes), shape_table(stored_tree)
    problems = []
    for k in sorted(set(want) | set(have)):
        if k not in have:
            problems.append(f"{k} missing in the checkpoint")
        elif k not in want:
            problems.append(f"{k} not in this config's state")
        elif want[k] != have[k]:
            problems.append(f"{k}: checkpoint {have[k]} vs config {want[k]}")
    if not problems:
        return
    note = ""
    meta = read_meta(manager, step)
    if isinstance(meta, dict) and config_json is not None:
        diff = json_diff(meta.get("config"), config_json)
        if diff:
            note = "\n  config differences (checkpoint -> now): " + "; ".join(diff[:10])
    raise CheckpointMismatchError(
        f"[{name}] the checkpoint at step {step} in {checkpoint_dir(stage_dir)} was made with a "
        f"different config ({len(problems)} arrays differ, e.g. {'; '.join(problems[:4])}){note}\n"
        f"  Delete the stage directory {os.path.abspath(stage_dir)} (or use another --workdir) "
        "to retrain this stage."
    )


def restore(manager, step: int, abstract_state, stage_dir: str, name: str, config_json=None):
    """Restores `state` into `abstract_state` (ShapeDtypeStructs with shardings)."""
    ocp = orbax()
    check_compatible(manager, step, abstract_state, stage_dir, name, config_json)
    out = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return out["state"]


def load_latest_state(stage_dir: str, abstract_state=None, name: str = "stage"):
    """Latest `state` of a finished stage (e.g. a teacher's params for distillation).

    With `abstract_state` (ShapeDtypeStructs, optionally with shardings) the tree is checked
    and restored into that layout; without, arrays come back as stored."""
    ocp = orbax()
    manager = open_manager(stage_dir)
    try:
        step = manager.latest_step()
        if step is None:
            raise MissingCheckpointError(
                f"[{name}] no checkpoint in {checkpoint_dir(stage_dir)} — run that stage first"
            )
        if abstract_state is None:
            return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        return restore(manager, step, abstract_state, stage_dir, name)
    finally:
        manager.close()


class StaleStageError(CheckpointMismatchError):
    """A stage's checkpoint was made with other settings (or from other upstream stages)."""


# Set by the main command's --retrain_stale: a stale stage is retrained instead of refused.
RETRAIN_STALE = {"enabled": False}


def identity_diffs(a, b, path: str = "") -> list[tuple[str, Any, Any]]:
    """(path, old, new) for every leaf where two JSON identities differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += identity_diffs(a.get(k), b.get(k), f"{path}{k}.")
        return out
    return [] if a == b else [(path[:-1] or "<root>", a, b)]


def _short(value: Any, limit: int = 48) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Settings that shape what a run shows or how often it saves, never the trained state: a
# change of these alone resumes the stage.
NOT_IDENTITY = frozenset({"grid_samples", "grid_labels", "log_every", "ckpt_every", "keep_checkpoints",
                          "eval_every", "fid_every"})


def check_identity(meta: dict | None, identity: Any, num_steps: int, stage_dir: str, name: str) -> list[str]:
    """Raises StaleStageError unless the stored identity equals `identity`, up to a longer
    run of this very stage (its own num_steps raised: resume and extend).

    A stage that never finished (stopped, killed, diverged) may continue with changes to
    its own settings only (e.g. a lower learning rate after a divergence): the changes
    are returned for a warning. Upstream changes and finished stages are refused."""
    if identity is None or not isinstance(meta, dict) or "config" not in meta:
        return []  # no identity recorded (tests, old checkpoints): the shape check still runs
    now = json.loads(json.dumps(identity))
    stored_target = meta.get("num_steps", meta.get("step"))
    changed, upstream = [], False
    for path, old, new in identity_diffs(meta["config"], now):
        if path.rsplit(".", 1)[-1] in NOT_IDENTITY:
            continue
        extends = (path.rsplit(".", 1)[-1] == "num_steps" and not path.startswith("upstream.")
                   and isinstance(old, int) and old == stored_target and new == num_steps and new > old)
        if not extends:
            changed.append(f"{path}: {_short(old)} -> {_short(new)}")
            upstream = upstream or path.startswith("upstream.")
    finished = isinstance(stored_target, int) and isinstance(meta.get("step"), int) and meta["step"] >= stored_target
    if changed and not upstream and not finished:
        return changed
    if changed:
        raise StaleStageError(
            f"[{name}] the checkpoint in {checkpoint_dir(stage_dir)} was made with other settings or from "
            f"other upstream stages ({len(changed)} differ: {'; '.join(changed[:6])}"
            f"{'; ...' if len(changed) > 6 else ''}) — delete the stage directory {os.path.abspath(stage_dir)} (and "
            "the stage directories after it) to retrain, rerun with --retrain_stale to retrain them, or restore "
            "the settings"
        )
    return []


def stored_identity(stage_dir: str) -> Any:
    """The identity stored with a stage's latest checkpoint (None when it has none)."""
    manager = open_manager(stage_dir)
    try:
        step = manager.latest_step()
        meta = None if step is None else read_meta(manager, step)
        return meta.get("config") if isinstance(meta, dict) else None
    finally:
        manager.close()


def json_diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += json_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if a != b:
        return [f"{prefix[:-1] or '<root>'}: {json.dumps(a)} -> {json.dumps(b)}"]
    return []
