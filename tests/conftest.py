"""Shared test fixtures. Tests needing ../shared/data fail under CI=true, skip elsewhere."""
import os

# Tests check values, not speed: at their sizes LLVM's optimisation of each compiled program
# costs more time than it saves (about a third of the suite's CPU time), and so does XLA CPU's
# newer fusion emitter pipeline (the older elemental emitters compile tiny programs about twice
# as fast: the suite's summed test time went from 1,129 s to 618 s). Set before the backend
# starts; subprocesses started by tests inherit it.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_backend_optimization_level=0",
                                    "--xla_llvm_disable_expensive_passes=true",
                                    "--xla_cpu_use_fusion_emitters=false"]).strip()

# Two pytest workers share the cores: a multi-threaded torch (OpenMP) spins on a busy core (next
# to one, the SmolLM2 generation test took 49 s instead of 13 s). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

from jaxmm.data import data_root  # noqa: E402

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


# The longest test (a subprocess on 8 host devices) is started first: pytest-xdist hands out
# files in collection order, so collected last it would leave one worker running it alone.
FIRST = "tests/sharding/test_mesh.py"


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: not item.path.as_posix().endswith(FIRST))  # stable otherwise
