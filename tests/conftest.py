"""Shared test fixtures. Tests needing ../shared/data fail under CI=true, skip elsewhere."""
import os

import jax
import pytest

from jaxmm.data import data_root

jax.config.update("jax_default_matmul_precision", "highest")


def require_data(*parts):
  """Path to shared data; fails in CI (CI=true) and skips locally when it is missing."""
  p = data_root().joinpath(*parts)
  if not p.exists():
    msg = f"shared data missing: {p} (set JAXMM_DATA)"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return p


@pytest.fixture
def shared_data():
  return require_data
