"""What a run leaves behind, written the same way by every stage and command.

- `log`: progress lines on stderr, from process 0 only;
- `writer`: the clu metric writer of a stage (TensorBoard in `<stage_dir>/tb`);
- `make_image_grid` / `save_image_grid` / `save_grid`: PNG grids, local or gs:// (through
  tf.io.gfile), mirrored to TensorBoard when a writer is given;
- `fingerprint`: the JSON of the config sub-trees that shaped a stage (stored with its
  checkpoints and cached rows: a different fingerprint is a different stage);
- `load_rows` / `save_rows`: a stage's cached metric rows (`<stage_dir>/rows.json`);
- `write_json`: atomic JSON files (metrics.json): readers never see half a file.
Only process 0 writes files; every function is a no-op elsewhere.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont


def is_lead() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    """A progress line on stderr, from process 0 only."""
    if is_lead():
        print(msg, file=sys.stderr, flush=True)


def is_remote(path: str) -> bool:
    return "://" in os.fspath(path)  # gs://, s3://: tf.io.gfile / orbax handle them


def writer(stage_dir: str):
    """The stage's clu metric writer (TensorBoard in <stage_dir>/tb; logging only off
    process 0)."""
    # Imported here: clu's writers import TensorFlow, which costs seconds and is needed only
    # once a stage writes summaries.
    from clu import metric_writers

    return metric_writers.create_default_writer(os.path.join(stage_dir, "tb"), just_logging=not is_lead())


def make_image_grid(images, nrow: int | None = None, padding: int = 2, pad_value: float = 0.0) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> (rows·(H+p)+p, nrow·(W+p)+p, C) uint8 grid, row-major.

    nrow is the number of images per row (default ceil(sqrt(N))); values are clipped to
    [0, 1] and rounded to 8 bits.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images must be NHWC with 1, 3 or 4 channels, got shape {images.shape}; "
            "add a batch axis with images[None] or move channels last"
        )
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain NaN or inf; the decoder or sampler produced invalid values")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    nrow = min(nrow, n)
    rows = math.ceil(n / nrow)
    pixels = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    pad = int(round(np.clip(pad_value, 0.0, 1.0) * 255.0))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad, np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = pixels[k]
    return grid


CAPTION_LINES = 2  # text lines under each image of a captioned grid
CAPTION_LINE_PX = 12
CAPTION_MIN_WIDTH = 96  # narrower images get a cell this wide, so a caption stays legible


def _fit_lines(draw, font, text: str, width: int, lines: int) -> list[str]:
    """`text` wrapped greedily into at most `lines` lines of `width` px (the last one cut with …)."""
    words, out, cur = text.split(), [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            out.append(cur)
            cur = word
    out.append(cur)
    if len(out) > lines:
        out = out[:lines]
        out[-1] += "…"
    for i, line in enumerate(out):
        while line and draw.textlength(line, font=font) > width:
            line = line[:-2] + "…"
        out[i] = line
    return out


def make_captioned_grid(images, captions, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Like `make_image_grid`, with each image's caption (its prompt or class) under it in a
    white strip of CAPTION_LINES lines; cells are at least CAPTION_MIN_WIDTH px wide (the
    image centred). Returns an RGB uint8 grid."""
    images = np.asarray(images, np.float32)
    captions = [str(c) for c in captions]
    if images.ndim != 4 or len(captions) != images.shape[0]:
        raise ValueError(f"need one caption per image: {len(captions)} captions for images of shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    images = images[..., :3]
    n, h, w, _ = images.shape
    nrow = min(nrow or math.ceil(math.sqrt(n)), n)
    cw, strip = max(w, CAPTION_MIN_WIDTH), CAPTION_LINES * CAPTION_LINE_PX
    cells = np.full((n, h + strip, cw, 3), 1.0, np.float32)
    x0 = (cw - w) // 2
    cells[:, :h, x0 : x0 + w] = np.clip(images, 0.0, 1.0)
    grid = make_image_grid(cells, nrow=nrow, padding=padding)
    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, text in enumerate(captions):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + strip + padding) + h, padding + col * (cw + padding)
        for i, line in enumerate(_fit_lines(draw, font, text, cw - 2, CAPTION_LINES)):
            draw.text((x + 1, y + i * CAPTION_LINE_PX), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_image_grid(images, path, nrow: int | None = None, padding: int = 2, pad_value: float = 0.0,
                    captions=None) -> str:
    """Writes `images` (N, H, W, C) in [0, 1] as one PNG grid (a local or gs:// path), with
    `captions` (one per image) under the images when given; returns the path."""
    if captions is not None:
        grid = make_captioned_grid(images, captions, nrow=nrow, padding=padding)
    else:
        grid = make_image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    path = os.fspath(path)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if is_remote(path):
        import tensorflow as tf  # gs:// goes through tf.io.gfile (imported only for remote paths)

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(buf.getvalue())
        return path
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format="PNG")
    return path


def save_grid(stage_dir: str, name: str, images, metric_writer=None, step: int = 0, nrow: int | None = 10,
              captions=None) -> None:
    """`<stage_dir>/<name>.png` (process 0) and, with a writer, the same grid as a
    TensorBoard image."""
    if not is_lead():
        return
    save_image_grid(images, os.path.join(stage_dir, f"{name}.png"), nrow=nrow, captions=captions)
    if metric_writer is not None:
        grid = make_image_grid(images, nrow=nrow).astype(np.float32) / 255.0
        metric_writer.write_images(step, {name: grid[None]})


# ----------------------------------------------------------------------------- JSON records


def to_jsonable(config) -> Any:
    """ConfigDict / nested dicts -> plain JSON types (for checkpoint metadata)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=str))


def fingerprint(config, *keys: str, **extra) -> dict:
    """JSON of the config sub-trees `keys` (those present) plus `extra` values: the
    identity stored with a stage's checkpoints and cached rows."""
    out = {k: to_jsonable(config[k]) for k in keys if k in config}
    out.update(to_jsonable(extra))
    return out


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON file (temporary file + rename), from process 0."""
    if not is_lead():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
    os.replace(tmp, path)


def rows_path(stage_dir: str) -> str:
    return os.path.join(stage_dir, "rows.json")


def load_rows(stage_dir: str, stage_fingerprint: dict) -> dict | None:
    """The rows cached in <stage_dir>/rows.json when they were made with this fingerprint."""
    path = rows_path(stage_dir)
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("config") == to_jsonable(stage_fingerprint):
            return cached["rows"]
    return None


def save_rows(stage_dir: str, stage_fingerprint: dict, rows: dict) -> None:
    write_json(rows_path(stage_dir), {"config": stage_fingerprint, "rows": rows})
