"""The parity checker is strict: a missing, unexpected or absent set of outputs fails."""

import json
import pathlib

import numpy as np
import pytest

from softdimo_jax import parity


def _rewrite(src: pathlib.Path, dst: pathlib.Path, drop=(), add=None, extra=None) -> str:
    with np.load(src) as z:
        entries = {k: z[k] for k in z.files if k not in drop}
    entries.update(add or {})
    entries.update(extra or {})
    np.savez(dst, **entries)
    return str(dst)


@pytest.fixture(scope="module")
def bert(fixtures_dir):
    return fixtures_dir / "maskbit_bert_a.npz"


def test_unchanged_fixture_passes(bert, capsys):
    assert parity.main([str(bert)]) == 0
    assert "all outputs within tolerance" in capsys.readouterr().out


@pytest.mark.parametrize("drop", [("out/logits", "out/input_bits"), ("out/input_bits",)])
def test_missing_outputs_fail(bert, tmp_path, capsys, drop):
    path = _rewrite(bert, tmp_path / "f.npz", drop=drop)
    assert parity.main([path]) == 1
    out = capsys.readouterr().out
    for d in drop:
        assert f"FAIL {d}" in out and "missing from the fixture" in out
    assert "all outputs within tolerance" not in out


def test_unexpected_output_fails(bert, tmp_path, capsys):
    path = _rewrite(bert, tmp_path / "f.npz", add={"out/hidden_states": np.zeros(3, np.float32)})
    assert parity.main([path]) == 1
    assert "FAIL out/hidden_states" in capsys.readouterr().out


def test_zero_compared_outputs_fail(fixtures_dir, tmp_path, capsys):
    """A fixture that names no outputs (its own `outputs` list empty) compares nothing: fail."""
    src = fixtures_dir / "maskbit_bert_a.npz"
    with np.load(src) as z:
        drop = tuple(k for k in z.files if k.startswith("out/"))
    path = _rewrite(src, tmp_path / "f.npz", drop=drop, extra={"outputs": np.asarray(json.dumps([]))})
    assert parity.main([path]) == 1
    assert "no output was compared" in capsys.readouterr().out


def test_fixture_named_output_list(bert, tmp_path):
    """A fixture may name the outputs it checks; one named but absent fails."""
    path = _rewrite(bert, tmp_path / "f.npz", drop=("out/input_bits",),
                    extra={"outputs": np.asarray(json.dumps(["logits", "hidden"]))})
    checks = parity.run_fixture(path)
    bad = [c.name for c in checks if not c.passed]
    assert bad == ["out/hidden"]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"not a zip at all"])
def test_bad_fixture_file_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    assert parity.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parity: ") and " — " in err[0]


def test_missing_fixture_and_no_args(tmp_path, capsys):
    assert parity.main([str(tmp_path / "nope.npz")]) == 2
    assert parity.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("parity: ") for e in err)
