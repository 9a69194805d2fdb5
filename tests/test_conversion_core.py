import numpy as np
import pytest

from softdimo_jax.conversion import ConversionError, StrictStateDict, check_params_match, load_state_dict


def test_strict_state_dict_lists_every_problem():
    sd = {"a.weight": np.zeros((2, 3)), "b.bias": np.zeros(4), "extra": np.zeros(1)}
    s = StrictStateDict(sd, name="toy")
    s.take("a.weight", (3, 2))
    s.take("b.bias", (4,))
    s.take("c.weight", (5,))
    with pytest.raises(ConversionError) as e:
        s.finish()
    msg = str(e.value)
    assert "c.weight" in msg and "missing" in msg
    assert "extra" in msg and "unexpected" in msg
    assert "a.weight: checkpoint (2, 3), model expects (3, 2)" in msg


def test_strict_state_dict_aliases_and_ignores():
    sd = {"token_emb.weight": np.ones((2, 2)), "loss.disc.w": np.ones(1)}
    s = StrictStateDict(sd, aliases={"token_emb.": "input_proj."}, ignore_prefixes=("loss.",))
    assert s.take("input_proj.weight", (2, 2)).sum() == 4
    s.finish()
    assert s.ignored == ["loss.disc.w"]


def test_check_params_match():
    want = {"a": {"kernel": np.zeros((2, 3))}}
    check_params_match({"a": {"kernel": np.ones((2, 3))}}, want)
    with pytest.raises(ConversionError, match="unfilled"):
        check_params_match({"a": {}}, want)
    with pytest.raises(ConversionError, match="misshapen"):
        check_params_match({"a": {"kernel": np.ones((3, 2))}}, want)


def test_load_npz_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    arrs = {"x.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.savez(tmp_path / "a.npz", **arrs)
    save_file(arrs, str(tmp_path / "a.safetensors"))
    for name in ("a.npz", "a.safetensors"):
        sd = load_state_dict(str(tmp_path / name))
        np.testing.assert_array_equal(sd["x.weight"], arrs["x.weight"])
    with pytest.raises(FileNotFoundError):
        load_state_dict(str(tmp_path / "nope.bin"))
    with pytest.raises(ConversionError, match="unknown checkpoint format"):
        (tmp_path / "a.txt").write_text("x")
        load_state_dict(str(tmp_path / "a.txt"))
