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
