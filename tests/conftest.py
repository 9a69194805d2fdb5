"""Test set-up: 8 fake CPU devices (must happen before jax is imported anywhere)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

FIXTURES = pathlib.Path(
    os.environ.get("SOFTDIMO_FIXTURES", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"parity fixtures not found at {FIXTURES}; set SOFTDIMO_FIXTURES")
    return FIXTURES
