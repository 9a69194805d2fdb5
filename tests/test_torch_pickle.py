"""The restricted PyTorch unpickler: real torch files load exactly, code never runs."""

import io
import os
import pathlib
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from softdimo_jax.conversion.state_dict import load_state_dict
from softdimo_jax.conversion.torch_pickle import RefusedGlobalError, UnknownObject, load_torch_file

DATA = pathlib.Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["torch_state_dict.bin", "torch_state_dict_legacy.pt"])
def test_real_torch_state_dict(name):
    sd = load_torch_file(DATA / name)
    want = np.load(DATA / "torch_state_dict_expected.npz")
    assert list(sd) == list(want.files)  # OrderedDict order kept
    for k in want.files:
        got = sd[k]
        assert isinstance(got, np.ndarray), k
        assert got.shape == want[k].shape, k
        np.testing.assert_array_equal(np.asarray(got).astype(want[k].dtype), want[k], err_msg=k)
    assert sd["bf16"].dtype == ml_dtypes.bfloat16
    assert sd["f16"].dtype == np.float16 and sd["i64"].dtype == np.int64 and sd["flag"].dtype == bool
    # Views come back as independent, correctly strided copies.
    np.testing.assert_array_equal(sd["transposed"], sd["f32"].T)
    np.testing.assert_array_equal(sd["shared_slice"], sd["shared_full"][3:8])
    np.testing.assert_array_equal(sd["strided"], sd["shared_full"][::3])


def test_lightning_style_checkpoint():
    ck = load_torch_file(DATA / "lightning_style.ckpt")
    assert ck["epoch"] == 3 and ck["global_step"] == 1200 and ck["pytorch-lightning_version"] == "1.9.0"
    assert ck["hyper_parameters"] == {"embed_dim": 256, "name": "vqgan", "ratios": [1.0, 2.0], "flags": {1, 2}}
    assert ck["size"] == (2, 3) and ck["dtype"] == np.float16
    assert float(ck["optimizer_states"][0]["state"][0]["step"]) == 7.0
    sd = load_state_dict(str(DATA / "lightning_style.ckpt"))  # unwraps `state_dict`
    assert sorted(sd) == ["loss.disc.weight", "model.bias", "model.weight"]
    np.testing.assert_array_equal(sd["model.bias"], [0.5, -1.0, 2.0])


def test_pickled_module_is_refused_with_clear_error():
    with pytest.raises(RefusedGlobalError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load_torch_file(DATA / "torch_module_pickle.pt")
    stub = load_torch_file(DATA / "torch_module_pickle.pt", stub_unknown=True)
    assert isinstance(stub, UnknownObject) and stub.qualname.endswith("Linear")
    assert stub.state["_parameters"]["weight"].shape == (2, 2)


class _RunsCode:
    """Pickles to GLOBAL <module>.<fn> + REDUCE with the given argument."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _evil_payloads(marker: pathlib.Path):
    yield "os.system", _RunsCode(os.system, f"touch {marker}")
    yield "builtins.eval", _RunsCode(eval, f"open({str(marker)!r}, 'w').write('x')")
    yield "builtins.exec", _RunsCode(exec, f"open({str(marker)!r}, 'w').write('x')")


def _as_torch_zip(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
    return buf.getvalue()


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_code_execution_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    for name, evil in _evil_payloads(marker):
        obj = {"state_dict": {"w": 1}, "evil": evil}
        path = tmp_path / f"evil_{container}.bin"
        if container == "zip":
            path.write_bytes(_as_torch_zip(pickle.dumps(obj, protocol=2)))
        else:  # legacy stream: magic, protocol, sys_info, then the object
            with open(path, "wb") as f:
                for rec in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
                    pickle.dump(rec, f, protocol=2)
                pickle.dump(obj, f, protocol=2)
                pickle.dump([], f, protocol=2)  # storage keys
        module = "posix" if name == "os.system" and os.name == "posix" else name.split(".")[0]
        with pytest.raises(RefusedGlobalError, match=rf"refusing to unpickle global ({module}|{name.split('.')[0]})\."):
            load_torch_file(path)
        assert isinstance(RefusedGlobalError("x"), pickle.UnpicklingError)
        # Even in the permissive mode the callable is only recorded, never called.
        stub = load_torch_file(path, stub_unknown=True)
        assert isinstance(stub["evil"], UnknownObject)
        assert not marker.exists(), f"{name} payload ran"


def test_not_a_torch_file(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"definitely not a pickle")
    with pytest.raises(pickle.UnpicklingError):
        load_torch_file(bad)
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "missing.bin")
