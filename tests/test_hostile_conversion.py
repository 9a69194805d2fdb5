"""Conversion refuses hostile or ambiguous checkpoints: duplicate names, hostile pickles
and zips (bounded in time and memory), truncated files; `convert` prints one line."""

import pathlib

import numpy as np
import pytest

from softdimo_jax import parity
from softdimo_jax.conversion.maskbit import convert_maskbit_bert
from softdimo_jax.conversion.state_dict import ConversionError, StrictStateDict
from softdimo_jax.models.maskbit_bert import maskbit_bert_from_cfg
from softdimo_jax.runtime.errors import BadInput


@pytest.fixture(scope="module")
def bert_fx(fixtures_dir):
    return parity.load_fixture(str(fixtures_dir / "maskbit_bert_a.npz"))


def test_key_and_legacy_alias_both_present_is_an_error(bert_fx):
    sd = dict(bert_fx.sd)
    sd["token_emb.weight"] = sd["input_proj.weight"] + 1.0
    with pytest.raises(ConversionError) as e:
        convert_maskbit_bert(sd, maskbit_bert_from_cfg(bert_fx.cfg))
    msg = str(e.value)
    assert "input_proj.weight and token_emb.weight both map to input_proj.weight" in msg
    assert isinstance(e.value, BadInput)


@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod."])
def test_wrapped_and_plain_copy_is_an_error(bert_fx, wrapper):
    sd = dict(bert_fx.sd)
    sd[wrapper + "last_layer.0.weight"] = sd["last_layer.0.weight"] * 0
    with pytest.raises(ConversionError, match=rf"last_layer\.0\.weight and {wrapper}last_layer\.0\.weight both map"):
        convert_maskbit_bert(sd, maskbit_bert_from_cfg(bert_fx.cfg))


def test_duplicates_do_not_depend_on_key_order():
    a = {"module.w": np.ones(2), "w": np.zeros(2)}
    for sd in (a, dict(reversed(list(a.items())))):
        s = StrictStateDict(sd, strip_prefixes=("module.",))
        s.take("w", (2,))
        with pytest.raises(ConversionError, match="both map to w"):
            s.finish()


# ---------------------------------------------------------------- hostile PyTorch files
# Built opcode by opcode (no torch needed): protocol 2, as torch.save writes.
import io
import pickle
import struct
import tracemalloc
import zipfile

from softdimo_jax.conversion.torch_pickle import RefusedGlobalError, TorchFileError, load_torch_file

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _op(value) -> bytes:
    """The opcodes that push `value` (no PROTO / STOP)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor(key: str, numel: int, offset: int, size, stride, storage: str = "FloatStorage") -> bytes:
    pid = b"(" + _op("storage") + _global("torch", storage) + _op(key) + _op("cpu") + _op(numel) + b"tQ"
    args = b"(" + pid + _op(offset) + _op(tuple(size)) + _op(tuple(stride)) + b"\x89" + \
        _global("collections", "OrderedDict") + b")R" + b"t"
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_dict(entries: dict) -> bytes:
    body = b"}(" + b"".join(_op(k) + v for k, v in entries.items()) + b"u"
    return b"\x80\x02" + body + b"."


def torch_zip(path, pickle_bytes: bytes, storages: dict, compress=zipfile.ZIP_STORED, extra=()):
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            if callable(raw):  # streamed: (chunk, count)
                with zf.open(f"archive/data/{key}", "w", force_zip64=True) as f:
                    raw(f)
            else:
                zf.writestr(f"archive/data/{key}", raw)
        for name, data in extra:
            zf.writestr(name, data)
    return str(path)


def hostile_files(tmp_path) -> dict:
    """name -> path of a tiny file that once took gigabytes, minutes or a traceback."""
    t = tmp_path
    files = {}
    one = np.ones(4, np.float32).tobytes()
    # Shared references: l = [l, l] sixty times (2**60 leaves if expanded).
    tower = []
    for _ in range(60):
        tower = [tower, tower]
    files["shared [l, l] x60"] = torch_zip(t / "tower.pt", pickle.dumps({"w": tower}, protocol=2), {})
    cyc = []
    cyc.append(cyc)
    files["self-referencing list"] = torch_zip(t / "cycle.pt", pickle.dumps({"w": cyc}, protocol=2), {})
    files["nested 100k deep"] = torch_zip(t / "deep.pt", b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".", {})
    files["stride-0 view 1e5x1e5"] = torch_zip(
        t / "stride0.pt", _state_dict({"w": _tensor("0", 4, 0, (100_000, 100_000), (0, 0))}), {"0": one})
    files["overlapping view 2**19 x 2**19"] = torch_zip(  # inside its 4 MiB storage, 1 TiB if copied
        t / "overlap.pt", _state_dict({"w": _tensor("0", 2**20, 0, (2**19, 2**19), (1, 1))}),
        {"0": np.zeros(2**20, np.float32).tobytes()})
    files["declared 4 GB storage, 16 B member"] = torch_zip(
        t / "declared.pt", _state_dict({"w": _tensor("0", 10**9, 0, (10**9,), (1,))}), {"0": one})
    views = {f"v{i}": _tensor("0", 2**20, 0, (2**20,), (1,)) for i in range(400)}  # 400 x 4 MiB copies
    files["400 views of one 4 MiB storage"] = torch_zip(
        t / "views.pt", _state_dict(views), {"0": np.zeros(2**20, np.float32).tobytes()})

    def zeros(f, n=2**27):  # 128 MiB of zeros deflate to ~130 KB
        chunk = bytes(2**22)
        for _ in range(n // len(chunk)):
            f.write(chunk)
    files["zip bomb member 128 MiB"] = torch_zip(
        t / "bomb.pt", _state_dict({"w": _tensor("0", 2**25, 0, (2**25,), (1,))}), {"0": zeros},
        compress=zipfile.ZIP_DEFLATED)
    files["bytearray(10**10) global"] = torch_zip(
        t / "bytearray.pt", b"\x80\x02" + _global("builtins", "bytearray") + _op((10**10,)) + b"R.", {})
    files["zip member ../../etc/passwd"] = torch_zip(
        t / "escape.pt", _state_dict({"w": _tensor("0", 4, 0, (4,), (1,))}), {"0": one},
        extra=[("../../etc/passwd", b"x")])
    good = torch_zip(t / "good.pt", _state_dict({"w": _tensor("0", 4, 0, (4,), (1,))}), {"0": one})
    raw = open(good, "rb").read()
    (t / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    files["truncated zip"] = str(t / "truncated.pt")
    (t / "garbage.pth").write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00w")
    files["truncated pickle"] = str(t / "garbage.pth")
    legacy = io.BytesIO()
    for rec in (_LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(rec, legacy, protocol=2)
    legacy.write(_state_dict({"w": _tensor("0", 4, 0, (4,), (1,))}))
    pickle.dump(["0"], legacy, protocol=2)
    legacy.write(struct.pack("<q", 2**60))  # declares 2**60 elements, holds 16 bytes
    legacy.write(one)
    (t / "legacy.pt").write_bytes(legacy.getvalue())
    files["legacy storage declares 2**60"] = str(t / "legacy.pt")
    return files


def test_good_hand_built_file_loads(tmp_path):
    """The builder is right: the same opcodes with sane numbers load."""
    one = np.arange(6, dtype=np.float32)
    path = torch_zip(tmp_path / "g.pt", _state_dict({"w": _tensor("0", 6, 1, (2, 2), (1, 2)),
                                                    "v": _tensor("0", 6, 0, (6,), (1,))}), {"0": one.tobytes()})
    sd = load_torch_file(path)
    np.testing.assert_array_equal(sd["w"], one[1:].reshape(2, 2, order="F")[:2, :2] if False else
                                  np.lib.stride_tricks.as_strided(one[1:], (2, 2), (4, 8)))
    np.testing.assert_array_equal(sd["v"], one)


def test_shared_structure_stays_shared(tmp_path):
    tower = []
    for _ in range(60):
        tower = [tower, tower]
    path = torch_zip(tmp_path / "t.pt", pickle.dumps({"w": tower}, protocol=2), {})
    got = load_torch_file(path)["w"]
    assert got[0] is got[1]  # one node per level, not 2**60
    cyc = []
    cyc.append(cyc)
    c = load_torch_file(torch_zip(tmp_path / "c.pt", pickle.dumps(cyc, protocol=2), {}))
    assert c[0] is c


REFUSED = ["nested 100k deep", "stride-0 view 1e5x1e5", "overlapping view 2**19 x 2**19",
           "declared 4 GB storage, 16 B member", "400 views of one 4 MiB storage", "zip bomb member 128 MiB",
           "bytearray(10**10) global", "zip member ../../etc/passwd", "truncated zip", "truncated pickle",
           "legacy storage declares 2**60"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return hostile_files(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("name", REFUSED)
def test_hostile_file_is_refused_in_bounded_memory(hostile, name):
    tracemalloc.start()
    try:
        with pytest.raises(TorchFileError) as e:
            load_torch_file(hostile[name])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(e.value, BadInput) and isinstance(e.value, pickle.UnpicklingError)
    assert " — " in str(e.value)
    assert peak < 300 * 2**20, f"{name}: peak {peak / 2**20:.0f} MiB"
    if name == "bytearray(10**10) global":
        assert isinstance(e.value, RefusedGlobalError)


@pytest.mark.parametrize("name", ["shared [l, l] x60", "self-referencing list"])
def test_shared_hostile_files_load_small(hostile, name):
    tracemalloc.start()
    try:
        load_torch_file(hostile[name])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


# ---------------------------------------------------------------- .npz / .safetensors / convert CLI
from softdimo_jax import convert as convert_cli
from softdimo_jax.conversion.state_dict import load_state_dict


def _npz_declaring_huge(path):
    """A 200-byte .npz whose one member says (10**10,) float32."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("w.npy", buf.getvalue() + bytes(16))
    return str(path)


def bad_weight_files(tmp_path) -> dict:
    t = tmp_path
    np.savez(t / "good.npz", w=np.ones((4, 4), np.float32))
    raw = (t / "good.npz").read_bytes()
    (t / "trunc.npz").write_bytes(raw[: len(raw) - 30])
    from safetensors.numpy import save_file
    save_file({"w": np.ones((64, 64), np.float32)}, str(t / "good.safetensors"))
    raw = (t / "good.safetensors").read_bytes()
    (t / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    header = b'{"w":{"dtype":"F32","shape":[100000,100000],"data_offsets":[0,40000000000]}}'
    (t / "huge.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    (t / "empty.pth").write_bytes(b"")
    return {
        "truncated .npz": str(t / "trunc.npz"),
        ".npz declaring 40 GB": _npz_declaring_huge(t / "huge.npz"),
        "truncated .safetensors": str(t / "trunc.safetensors"),
        ".safetensors declaring 40 GB": str(t / "huge.safetensors"),
        "empty .pth": str(t / "empty.pth"),
        "directory as checkpoint": str(t),
        "missing file": str(t / "nope.bin"),
    }


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory):
    return bad_weight_files(tmp_path_factory.mktemp("badw"))


@pytest.mark.parametrize("name", [".npz declaring 40 GB", "truncated .npz", "truncated .safetensors",
                                  ".safetensors declaring 40 GB", "empty .pth", "directory as checkpoint",
                                  "missing file"])
def test_bad_weight_file_is_one_line_bad_input(bad_weights, name):
    tracemalloc.start()
    try:
        with pytest.raises(BadInput) as e:
            load_state_dict(bad_weights[name])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert " — " in str(e.value) and peak < 50 * 2**20


def _cli(argv, capsys):
    rc = convert_cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


@pytest.mark.parametrize("name", ["truncated .npz", "empty .pth", "missing file"])
def test_convert_cli_bad_source_is_one_line(bad_weights, tmp_path, capsys, name):
    rc, _, err = _cli(["--model", "maskgit_transformer", bad_weights[name], str(tmp_path / "out")], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("convert: ") and " — " in err[0], err
    assert not (tmp_path / "out").exists()


def test_convert_cli_refused_global_is_one_line(hostile, tmp_path, capsys):
    rc, _, err = _cli(["--model", "maskgit_transformer", hostile["bytearray(10**10) global"],
                       str(tmp_path / "out")], capsys)
    assert rc == 2 and len(err) == 1 and "refusing to unpickle global builtins.bytearray" in err[0]


def test_convert_debug_shows_traceback(bad_weights, tmp_path, capsys):
    rc = convert_cli.main(["--debug", "--model", "maskgit_transformer", bad_weights["empty .pth"],
                           str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err


@pytest.mark.parametrize("setting,expect", [
    ("ch_mult=1,2", None),                  # a list field: accepted as [1, 2]
    ("depth=twelve", "not JSON"),
    ("hidden_dim=1,2", "not JSON"),
    ("hidden_dim=[1,2]", "expected a int"),
    ("dropout=true", "expected a float"),
    ("nosuchfield=1", "no such field"),
    ("depth", "must look like FIELD=VALUE"),
])
def test_convert_set_values(setting, expect):
    fields = {"ch_mult": [1, 1, 2], "depth": 24, "hidden_dim": 768, "dropout": 0.1}
    if expect is None:
        assert convert_cli.parse_overrides([setting], fields) == {"ch_mult": [1, 2]}
        return
    with pytest.raises(BadInput, match=expect):
        convert_cli.parse_overrides([setting], fields)


def test_convert_set_on_cli_and_help(capsys, tmp_path, fixtures_dir):
    rc, _, err = _cli(["--model", "maskgit_transformer", "--set", "depth=1,2",
                       str(fixtures_dir / "maskgit_transformer_a.npz"), str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err) == 1 and "--set 'depth=[1,2]'" in err[0]
    # The strict mismatch points at --set.
    rc, _, err = _cli(["--model", "maskgit_transformer", str(fixtures_dir / "maskgit_transformer_a.npz"),
                       str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err) == 1 and "--set FIELD=VALUE" in err[0] and "misshapen keys" in err[0]
    with pytest.raises(SystemExit):
        convert_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "VALUE is JSON" in out and "taming_vqgan" in out and "ch_mult=[1, 1, 2, 2, 4]" in out


# ---------------------------------------------------------------- convert --overwrite never destroys data
import errno
import os
import shutil

from softdimo_jax.runtime import converted
from softdimo_jax.runtime.errors import RunFailure


@pytest.fixture
def vit(fixtures_dir, tmp_path):
    """SRC (the maskgit fixture) and argv that converts it into tmp_path/ckpt."""
    src = tmp_path / "src.npz"
    shutil.copy(fixtures_dir / "maskgit_transformer_a.npz", src)
    fx = parity.load_fixture(str(src))
    sets = []
    for k, v in fx.cfg.items():
        if k in convert_cli.family_fields("maskgit_transformer"):
            sets += ["--set", f"{k}={v}"]
    return src, ["--model", "maskgit_transformer", *sets]


def test_overwrite_replaces_only_a_converted_checkpoint(vit, tmp_path, capsys):
    src, argv = vit
    dst = tmp_path / "ckpt"
    assert convert_cli.main(argv + [str(src), str(dst)]) == 0
    before = (dst / "model.json").read_text()
    # A converted checkpoint is replaced, leaving nothing beside it.
    assert convert_cli.main(argv + ["--overwrite", str(src), str(dst)]) == 0
    assert (dst / "model.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src.npz"]
    converted.load_converted(str(dst))
    capsys.readouterr()
    # Unrelated files, a plain file and the source itself are never replaced.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    (tmp_path / "afile").write_text("x")
    for target in (other, tmp_path / "afile", tmp_path):
        rc, _, err = _cli(argv + ["--overwrite", str(src), str(target)], capsys)
        assert rc == 2 and len(err) == 1 and ("refused" in err[0] or "holds the source" in err[0]), err
    assert (other / "thesis.tex").read_text() == "years of work" and src.exists()
    (dst / "extra.txt").write_text("mine")  # a checkpoint someone added files to
    rc, _, err = _cli(argv + ["--overwrite", str(src), str(dst)], capsys)
    assert rc == 2 and "extra.txt" in err[0] and (dst / "extra.txt").exists()


def test_full_disk_keeps_the_old_checkpoint(vit, tmp_path, capsys, monkeypatch):
    src, argv = vit
    dst = tmp_path / "ckpt"
    assert convert_cli.main(argv + [str(src), str(dst)]) == 0
    capsys.readouterr()

    class FullDisk:
        def save(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(converted, "orbax", lambda: type("O", (), {"StandardCheckpointer": FullDisk}))
    rc, _, err = _cli(argv + ["--overwrite", str(src), str(dst)], capsys)
    assert rc == 1 and len(err) == 1 and "no space left" in err[0] and "MiB" in err[0] and str(tmp_path) in err[0]
    monkeypatch.undo()
    converted.load_converted(str(dst))  # the old one is intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src.npz"]  # nothing half-written left


def test_damaged_converted_checkpoint_is_one_line(vit, tmp_path, capsys):
    src, argv = vit
    dst = tmp_path / "ckpt"
    assert convert_cli.main(argv + [str(src), str(dst)]) == 0
    shutil.rmtree(dst / "params")
    (dst / "params").mkdir()
    with pytest.raises(BadInput, match="cannot be read .* — re-create"):
        converted.load_converted(str(dst))
    (dst / "model.json").write_text("{not json")
    with pytest.raises(BadInput, match="unreadable"):
        converted.load_converted(str(dst))
    with pytest.raises(BadInput, match="not a converted checkpoint"):
        converted.load_converted(str(tmp_path))
