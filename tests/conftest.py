"""Test-wide settings: 8 fake CPU devices, strict numerics, paths to shared fixtures."""
import os
import pathlib

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("BVL_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """../shared/fixtures (reference checkpoints from big_vision and transformers)."""
  if not FIXTURES.is_dir():
    raise FileNotFoundError(
        f"reference fixtures not found at {FIXTURES}: clone the repo beside shared/ "
        "or set BVL_FIXTURES")
  return FIXTURES
