"""One process of the multi-process tests (tests/test_multiprocess.py), started by
launch/local_multiprocess.sh (ENTRY=this file): N processes × D CPU devices joined by
jax.distributed through softdimo_jax.runtime.distributed, the same start-up as a pod.

Modes:
  phases   the smoke config's distillation (--distill_steps steps), GAN and reward phases
           (digits-smoke sizes, a random teacher / tokenizer made from a fixed seed, 3 steps
           each) through pipelines.phases, i.e. the Trainer, its one jitted step, the orbax
           checkpoints; on a complete workdir every phase only restores. Process 0 writes
           <out>/phases.npz: each phase's logged losses and final state (gathered). Every
           process records its data shards (GAN real batches, tfds rows, prompts) and calls
           the process-0-only writers (grid, metrics.json) on its own directory; with
           --fid_fixture, FID Inception features of 12 images fed per process.
  distill  the phases mode's distillation alone, as `softdimo_jax.main` runs a stage: under
           the workdir lock (.softdimo.lock), resuming from the latest checkpoint. Every
           process writes <out>/pid_<process> at start and appends each finished step to
           <out>/progress_<process> (then sleeps --step_sleep s, so a test can interrupt it
           mid-run); on SIGTERM the Trainer saves the step and the worker exits 0 as main
           does (<out>/preempted_<process>.json); at the end process 0 writes
           <out>/distill.npz (logged losses and their steps, the step it resumed from, the
           final state).
With --restore_workdir (either mode), a complete phases workdir written by another process
count is first restored into <restore_out>/phases.npz (nothing trains) in the same launch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from softdimo_jax.runtime.distributed import Preempted, maybe_initialize_distributed  # noqa: E402

maybe_initialize_distributed()  # before anything touches the devices

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from configs.digits import get_config  # noqa: E402
from softdimo_jax.core import objectives  # noqa: E402
from softdimo_jax.core import reward as rewards  # noqa: E402
from softdimo_jax.core.adapters import make_adapter  # noqa: E402
from softdimo_jax.core.gan import GanRefiner  # noqa: E402
from softdimo_jax.conversion.inception import convert_inception  # noqa: E402
from softdimo_jax.data import digits, prompts, tfds_images  # noqa: E402
from softdimo_jax.evaluation.fid import InceptionFeatureExtractor  # noqa: E402
from softdimo_jax.models.inception import FIDInceptionV3  # noqa: E402
from softdimo_jax.parity import load_fixture  # noqa: E402
from softdimo_jax.pipelines import phases  # noqa: E402
from softdimo_jax.runtime import artifacts  # noqa: E402
from softdimo_jax.runtime import mesh as meshlib  # noqa: E402
from softdimo_jax.runtime.workdir_lock import workdir_lock  # noqa: E402


def gathered(tree):
    """Global values of (possibly multi-host sharded) arrays, as numpy."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def flat(prefix, tree, out):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(x)


def models(config):
    """The smoke tokenizer and teacher with random weights (the same on every process)."""
    tok = objectives.tokenizer_from_config(config.tokenizer.model)
    size = int(config.data.image_size)
    tok_params = tok.init(jax.random.PRNGKey(1), jnp.zeros((1, size, size, int(config.data.channels))))["params"]
    grid = size // tok.downsample_factor
    teacher = objectives.teacher_from_config(config.teacher.model, grid * grid, tok.num_bits)
    t_params = teacher.init(jax.random.PRNGKey(2), jnp.zeros((1, grid * grid, teacher.splits), jnp.int32),
                            jnp.zeros((1,), jnp.int32))["params"]
    as_np = lambda t: jax.tree.map(np.asarray, t)
    return tok, as_np(tok_params), grid, teacher, as_np(t_params)


def distill_setup(config, distill_steps: int):
    """The distillation config on a (data 4, fsdp 2) mesh (the data axis spans the processes)."""
    dcfg = config.distill
    dcfg.fsdp = 2
    if distill_steps:
        dcfg.num_steps = distill_steps
    return dcfg, meshlib.make_mesh(None, fsdp=2)


def run_phases(workdir, config, out: dict, shards: dict, distill_steps: int) -> None:
    dcfg, mesh = distill_setup(config, distill_steps)
    tok, tok_params, grid, teacher, t_params = models(config)

    result, distiller = phases.train_distill(dcfg, teacher, t_params, os.path.join(workdir, "distill"), mesh)
    out["distill/losses"] = np.asarray([h["loss"] for h in result.history], np.float64)
    out["distill/resumed_from"] = np.asarray(-1 if result.resumed_from is None else result.resumed_from)
    flat("distill/state", gathered(result.state), out)

    # GAN: real token batches, this process's rows of each global batch (the digits path).
    gcfg = config.gan
    refiner = GanRefiner(make_adapter(teacher, dcfg), dcfg, gcfg, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2**tok.num_bits, (64, grid * grid)).astype(np.int32)
    labels = (np.arange(64) % 10).astype(np.int32)
    bs, local = int(gcfg.batch_size), digits.process_slice(int(gcfg.batch_size))

    def batch_fn(step):
        idx = digits.batch_indices(len(tokens), bs, step, 7)[local]
        shards.setdefault("gan_rows", {})[str(step)] = idx.tolist()
        return {"indices": tokens[idx], "labels": labels[idx]}

    placed = distiller.place_teacher(t_params)
    init = lambda s, tp: refiner.init_state(jax.random.PRNGKey(int(gcfg.seed)), s, tp)
    gan = phases.train_refinement("gan", refiner, init, (result.state, placed), gcfg,
                                  os.path.join(workdir, "gan"), batch_fn=batch_fn,
                                  frozen={"teacher": placed}, keep=2, fingerprint={"phase": "gan"})
    out["gan/losses"] = np.asarray([h["loss"] for h in gan.history], np.float64)
    flat("gan/state", gathered(gan.state), out)

    # Reward fine-tuning from the GAN state with a weight-free reward (decodes soft images).
    rcfg = config.reward
    rset = rewards.build_reward_set({"brightness": 1.0})
    rref = rewards.RewardRefiner(make_adapter(teacher, dcfg), dcfg, rcfg, tok, rset, (grid, grid), mesh)
    rew = phases.train_refinement(
        "reward", rref, rref.init_state, (gan.state.dimo,), rcfg, os.path.join(workdir, "reward"),
        batch_fn=lambda step: None, frozen={"teacher": placed, "tokenizer": tok_params, "reward": rset.params},
        keep=2, fingerprint={"phase": "reward"})
    out["reward/losses"] = np.asarray([h["loss"] for h in rew.history], np.float64)
    flat("reward/state", gathered(rew.state), out)


def record_data_shards(args, shards: dict) -> None:
    """This process's rows of the tfds (array_record) batches and of the prompt file."""
    if args.tfds_dir:
        import test_tfds_images  # registers the tiny builders

        del test_tfds_images
        source = tfds_images.TfdsImageSource("tiny_images_array_record", "train", args.tfds_dir, image_size=8)
        fn = tfds_images.make_batch_fn(source, 4, seed=3)
        shards["tfds"] = {str(s): {"label": fn(s)["label"].tolist(),
                                   "sum": np.round(fn(s)["image"].sum(axis=(1, 2, 3)), 4).tolist()}
                          for s in range(3)}
    if args.prompt_file:
        shards["prompts"] = prompts.shard_prompts(prompts.read_prompts(args.prompt_file))


def record_fid(args, out: dict) -> None:
    """FID Inception features (the fixture's weights, 75 px input) of 12 images, each process
    feeding its own rows of every global batch of 8; the extractor gathers them."""
    params = convert_inception(load_fixture(args.fid_fixture).sd)
    ext = InceptionFeatureExtractor(params, mesh=meshlib.make_mesh(None), batch_size=8,
                                    model=FIDInceptionV3(input_size=75, precision="highest"))
    rng = np.random.default_rng(0)
    images = np.round(np.kron(rng.uniform(0, 1, (12, 4, 4, 3)), np.ones((1, 6, 6, 1))) * 255).astype(np.uint8)
    n, me = jax.process_count(), jax.process_index()
    feats = []
    for j in range(0, len(images), 8):
        chunk = images[j : j + 8]
        per = len(chunk) // n
        feats.append(ext(chunk[me * per : (me + 1) * per]))
    for k in feats[0]:
        out[f"fid/{k}"] = np.concatenate([f[k] for f in feats])


def run_distill(args, config) -> int:
    dcfg, mesh = distill_setup(config, args.distill_steps)
    _, _, _, teacher, t_params = models(config)
    me = jax.process_index()
    with open(os.path.join(args.out, f"pid_{me}"), "w") as f:
        f.write(str(os.getpid()))

    def on_step_end(step, state):
        with open(os.path.join(args.out, f"progress_{me}"), "a") as f:
            f.write(f"{step}\n")
        time.sleep(args.step_sleep)

    with workdir_lock(args.workdir):  # what softdimo_jax.main holds around a run
        try:
            result, _ = phases.train_distill(dcfg, teacher, t_params, os.path.join(args.workdir, "distill"), mesh,
                                             on_step_end=on_step_end)
        except Preempted as e:
            with open(os.path.join(args.out, f"preempted_{me}.json"), "w") as f:
                json.dump({"step": e.step, "stage": e.stage}, f)
            return 0  # what softdimo_jax.main does
    out = {"losses": np.asarray([h["loss"] for h in result.history], np.float64),
           "loss_steps": np.asarray([h["step"] for h in result.history], np.int64),
           "resumed_from": np.asarray(-1 if result.resumed_from is None else result.resumed_from)}
    flat("distill/state", gathered(result.state), out)
    if me == 0:
        np.savez(os.path.join(args.out, "distill.npz"), **out)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("phases", "distill"), default="phases")
    p.add_argument("--distill_steps", type=int, default=0, help="0: the smoke config's")
    p.add_argument("--step_sleep", type=float, default=0.0)
    p.add_argument("--restore_workdir", default="")
    p.add_argument("--restore_out", default="")
    p.add_argument("--tfds_dir", default="")
    p.add_argument("--prompt_file", default="")
    p.add_argument("--fid_fixture", default="")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = get_config("smoke").copy_and_resolve_references()
    me = jax.process_index()
    if args.restore_workdir:
        restored: dict = {}
        run_phases(args.restore_workdir, config.copy_and_resolve_references(), restored, {}, args.distill_steps)
        if me == 0:
            os.makedirs(args.restore_out, exist_ok=True)
            np.savez(os.path.join(args.restore_out, "phases.npz"), **restored)
    if args.mode == "distill":
        return run_distill(args, config)
    shards = {"process": me, "processes": jax.process_count(), "pid": os.getpid(),
              "local_devices": jax.local_device_count(), "devices": jax.device_count()}
    out: dict = {}
    run_phases(args.workdir, config, out, shards, args.distill_steps)
    record_data_shards(args, shards)
    if args.fid_fixture:
        record_fid(args, out)
    # The process-0-only writers, each process on its own directory.
    own = os.path.join(args.out, f"writers_{me}")
    artifacts.save_grid(own, "grid", np.zeros((2, 4, 4, 1), np.float32))
    artifacts.write_json(os.path.join(own, "metrics.json"), {"rows": {}})
    with open(os.path.join(args.out, f"shards_{me}.json"), "w") as f:
        json.dump(shards, f)
    if me == 0:
        np.savez(os.path.join(args.out, "phases.npz"), **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
