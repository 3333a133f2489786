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


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
  """Drops every compiled executable after each test module.

  XLA's CPU backend maps each executable's code into memory (about five mappings each) and
  keeps them for as long as a jit cache holds it. A pytest worker that runs a few hundred tests
  otherwise reaches the kernel's per-process limit on mappings (vm.max_map_count, 65,530 by
  default), and the next compile crashes the worker (SIGSEGV or SIGABRT in
  `backend_compile_and_load`). A module's own fixtures keep what it reuses until it ends.
  """
  yield
  jax.clear_caches()
  if os.environ.get("JAXMM_TRACE_MAPS"):
    with open("/proc/self/maps") as f, open(os.environ["JAXMM_TRACE_MAPS"], "a") as out:
      out.write(f"{sum(1 for _ in f)}\n")
