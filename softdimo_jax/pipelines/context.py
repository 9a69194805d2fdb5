"""The typed state a pipeline run carries from stage to stage.

A stage is `Stage(name, fn)` with `fn(ctx: RunContext) -> None`: it reads what earlier
stages left in the context and fills in its own field. Everything a stage hands on is a
named field here, so what a stage needs is visible in its signature's uses, not in string
keys.

Every stage has an identity (`RunContext.identity`): the config blocks that shaped it (the
seed always included) plus the identities of the stages it consumed. It is stored with the
stage's checkpoints and cached rows; a rerun whose identity differs refuses the stage (or
retrains it with --retrain_stale), and, since identities chain, everything downstream too.
A longer num_steps of the stage itself resumes and extends it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from softdimo_jax.models import lfq
from softdimo_jax.runtime import artifacts
from softdimo_jax.sampling import codec


class SeedOffsets:
    """Offsets from `config.seed` of the pipeline's random streams. Fixed: changing one
    changes every number of metrics.json that the stream feeds."""

    TOKENIZER_BATCHES = 1
    TEACHER_BATCHES = 2
    TEACHER_GRID = 99  # the teacher stage's sample grid
    TEACHER_ROWS = 1000  # + the number of sampling steps: the evaluate_teacher rows
    STUDENT_ROWS = 2000  # every one-step row (dimo, GAN, reward, TTEO): paired differences
    GAN_REAL_BATCHES = 17  # offset from gan.seed: the real batches of the GAN phases


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[["RunContext"], None]


@dataclasses.dataclass
class TokenizerRun:
    model: Any  # ConvVQModel
    params: Any
    grid: int  # tokens per side
    splits: int  # the teacher's split of each token's bits
    train_tokens: np.ndarray  # (N, grid²) full token ids of the train split
    test_recon: np.ndarray  # test-split reconstructions (N, H, W, C)

    def decode_subtokens(self, sub) -> np.ndarray:
        """(B, L, S) teacher sub-tokens -> images (B, H, W, C) in [0, 1]."""
        ids = np.asarray(lfq.merge_splits(sub, self.model.num_bits, self.splits))
        return codec.decode_tokens(self.model, self.params, ids, self.grid)


@dataclasses.dataclass
class TeacherRun:
    model: Any  # LFQBert
    params: Any  # the EMA weights when sampler.use_ema
    state: Any
    samplers: dict = dataclasses.field(default_factory=dict)  # steps -> jitted sampler


@dataclasses.dataclass
class GeneratorRun:
    """A one-step generator: its whole training state and the weights it samples with."""

    state: Any  # core.dimo.DistillState
    params: Any


@dataclasses.dataclass
class RunContext:
    config: Any
    workdir: str
    mesh: Any
    data: dict  # {"train": (images, labels), "test": (images, labels)}, NHWC in [0, 1]
    metrics: dict = dataclasses.field(default_factory=lambda: {"floor": {}, "rows": {}, "timings": {}})
    tokenizer: TokenizerRun | None = None
    teacher: TeacherRun | None = None
    evaluator: Any = None  # evaluation.digits_metrics.DigitsEvaluator
    # One-step generators by the stage that made them: distill, softdimo_gan, gumbel_gan, reward.
    generators: dict[str, GeneratorRun] = dataclasses.field(default_factory=dict)
    # Stage name -> its identity (see the module docstring), filled as stages run.
    identities: dict[str, dict] = dataclasses.field(default_factory=dict)

    def identity(self, stage: str, *keys: str, upstream: tuple[str, ...] = (), **extra) -> dict:
        """The identity of `stage`: config blocks `keys` (and `seed`), `extra` values, and
        the identities of the `upstream` stages it consumed; recorded for later stages."""
        missing = [u for u in upstream if u not in self.identities]
        if missing:
            raise KeyError(f"stage {stage} consumes {missing}, which have not run yet")
        ident = {"config": artifacts.fingerprint(self.config, "seed", *keys, **extra),
                 "upstream": {u: self.identities[u] for u in upstream}}
        self.identities[stage] = ident
        return ident

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, "metrics.json")

    def write_metrics(self) -> None:
        artifacts.write_json(self.metrics_path, self.metrics)

    def add_rows(self, rows: dict[str, dict]) -> None:
        """Adds metric rows ({name: {fd_digits, accuracy, precision, recall, ...}}) and saves."""
        self.metrics["rows"].update(rows)
        self.write_metrics()

    def record_time(self, name: str, seconds: float) -> None:
        self.metrics["timings"][name] = round(seconds, 2)

    def latest_generator(self, names: tuple[str, ...]) -> tuple[str, GeneratorRun]:
        """The first of `names` (in order of preference) that this run has trained."""
        for name in names:
            if name in self.generators:
                return name, self.generators[name]
        raise KeyError(f"none of the generators {names} exists yet; run the distill stage first")
