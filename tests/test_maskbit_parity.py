"""The MaskBit ports reproduce the PyTorch fixtures through the real converters."""

import pathlib

import pytest

from softdimo_jax import parity

DATA = pathlib.Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["maskbit_bert_a.npz", "maskbit_tokenizer_a.npz"])
def test_fixture_passes(fixtures_dir, name):
    checks = parity.run_fixture(str(fixtures_dir / name))
    assert checks, "no outputs were compared"
    for c in checks:
        assert c.passed, c.line()


def test_parity_cli_exit_status(capsys):
    rc = parity.main([str(DATA / "maskbit_bert_s3_nomask.npz")])
    assert rc == 0
    assert "all outputs within tolerance" in capsys.readouterr().out


def test_broken_weights_fail_parity(fixtures_dir):
    """A perturbed weight must make the check fail (the comparison is not vacuous)."""
    fx = parity.load_fixture(str(fixtures_dir / "maskbit_bert_a.npz"))
    fx.sd["transformer.layers.0.1.net.0.bias"] = fx.sd["transformer.layers.0.1.net.0.bias"] + 0.1
    checks = parity.family_check(fx.model)(fx)
    assert not all(c.passed for c in checks)


@pytest.mark.parametrize(
    "name", ["maskbit_bert_prenorm_s1.npz", "maskbit_bert_s3_nomask.npz", "maskbit_tokenizer_pool.npz"]
)
def test_extra_config_fixtures(name):
    """Configs beyond the shared fixtures (pre-norm, 1 and 3 splits, average-pool
    down-sampling, separate decoder depth, non-square images); see tests/data/README.md."""
    checks = parity.run_fixture(str(DATA / name))
    assert len(checks) >= 3
    for c in checks:
        assert c.passed, c.line()
