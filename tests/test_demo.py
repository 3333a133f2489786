"""`make demo` end to end: the tiny preset trained into a temporary cache, 2 test images."""
import json

import jax
import pytest

from jaxmm import demo
from jaxmm.cli import module_main

ROW_FIELDS = {"method", "budget_pct", "schedule", "stages", "average_visual", "accuracy_pct",
              "overall_pct", "retention_pct", "flops_reduction_pct", "latency_median_s",
              "latency_ratio", "eval_s"}


@pytest.fixture
def fast_compile():
  """The demo compiles 16 schedules of a tiny model: XLA's optimisations cost more than they save."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def test_mix_matches_the_layer_averaged_budget():
  # 8 layers, 144 visual tokens: random at round(0.625 * 8) = 5, keeping ~0.13 of DivPrune's.
  assert [demo.mix_stages(t, 144, 8) for t in (48, 32, 16)] == [(5, 71, 9), (5, 48, 6), (5, 24, 3)]
  assert demo.mix_stages(2, 16, 2) == (1, 3, 1)   # the stage-2 keep is at least 1


def test_demo_end_to_end(tmp_path, monkeypatch, capsys, fast_compile):
  monkeypatch.setenv("JAXMM_CACHE", str(tmp_path / "cache"))
  out = tmp_path / "results"
  assert module_main("jaxmm.demo", ["--preset", "tiny", "--images", "2", "--runs", "1",
                                    "--results", str(out)]) == 0
  assert "total wall time" in capsys.readouterr().out
  assert len(list((tmp_path / "cache").glob("digits-vlm-*/model"))) == 1      # trained, cached
  assert len(list((tmp_path / "cache").glob("digits-vqa-test-*/images/*.png"))) == 2
  res = json.loads((out / "demo.json").read_text())
  assert res["questions"] == 6 and res["flops_convention"] == "B" and res["n_text"] > 0
  rows = res["rows"]
  assert len(rows) == 16 and all(set(r) >= ROW_FIELDS for r in rows)
  assert set(rows[0]["accuracy_pct"]) == {"cell", "count", "presence"}
  assert rows[0]["method"] == "unpruned" and rows[0]["retention_pct"] == 100
  assert rows[0]["flops_reduction_pct"] == 0 and rows[0]["latency_ratio"] == 1
  assert all(r["flops_reduction_pct"] > 0 and r["latency_ratio"] > 0 for r in rows[1:])
  for method in demo.METHODS:
    mine = [r for r in rows if r["method"] == method]
    assert [r["budget_pct"] for r in mine] == [33, 22, 11]
    red = [r["flops_reduction_pct"] for r in mine]
    assert red == sorted(set(red)), (method, red)    # strictly more as the budget shrinks
  assert (out / "demo_accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporaries left
