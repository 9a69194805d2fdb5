"""Labels and batches of the evaluation samplers: every row is sampled in the same
class-ordered label sequence, in batches padded to one compiled shape."""

from __future__ import annotations

from typing import Iterator

import numpy as np


def class_ordered_labels(n: int, num_classes: int) -> np.ndarray:
    """(n,) int32 labels 0, 1, ..., num_classes − 1, 0, 1, ...: balanced rows, and a grid
    of 10 per row shows one class per column."""
    return (np.arange(n) % num_classes).astype(np.int32)


def padded_label_batches(labels, batch_size: int, multiple: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """(offset i, labels[i:i+batch_size] padded with zeros to a multiple of `multiple` (the
    mesh size), number of real rows) for consecutive batches; callers keep the first rows
    of each output."""
    labels = np.asarray(labels, np.int32)
    for i in range(0, len(labels), batch_size):
        lab = labels[i : i + batch_size]
        pad = -len(lab) % multiple
        yield i, np.concatenate([lab, np.zeros(pad, np.int32)]), len(lab)
