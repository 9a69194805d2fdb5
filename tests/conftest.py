"""Test set-up: 8 fake CPU devices (must happen before jax is imported anywhere)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

# Parity fixtures ship with the tests (tests/fixtures); SOFTDIMO_FIXTURES points elsewhere.
DEFAULT_FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
FIXTURES = pathlib.Path(os.environ.get("SOFTDIMO_FIXTURES") or DEFAULT_FIXTURES)


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        where = "SOFTDIMO_FIXTURES" if os.environ.get("SOFTDIMO_FIXTURES") else "default"
        pytest.fail(
            f"parity fixtures not found at {FIXTURES} ({where}); they are expected in tests/fixtures "
            f"({DEFAULT_FIXTURES}), or in the folder named by the SOFTDIMO_FIXTURES environment variable"
        )
    return FIXTURES


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (xdist's default `--dist load`) shares whole files, costliest first
    (tests/xdist_schedule.py); any other `--dist` mode is left to xdist."""
    if config.getvalue("dist") != "load":
        return None
    import xdist_schedule  # tests/ is on sys.path; xdist is only there when this hook is called

    return xdist_schedule.CostliestFileFirst(config, log)
