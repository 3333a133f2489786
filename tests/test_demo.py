"""`make demo` end to end: the tiny preset trained into a temporary cache, 2 test images."""
import dataclasses
import json
import statistics

import jax
import numpy as np
import pytest
from PIL import Image

import jaxmm

from jaxmm import demo
from jaxmm.cli import module_main
from jaxmm.pruning import schedule
from jaxmm.train import vlm

ROW_FIELDS = {"method", "budget_pct", "budget", "seeds", "overall_std_pct", "schedule", "stages", "average_visual", "accuracy_pct",
              "overall_pct", "retention_pct", "flops_reduction_pct", "latency_median_s",
              "latency_ratio", "eval_s", "ink_kept_pct"}


@pytest.fixture
def fast_compile():
  """The demo compiles 16 schedules of a tiny model: XLA's optimisations cost more than they save."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def test_every_method_meets_the_same_layer_averaged_budget():
  # 8 layers, 144 visual tokens: budgets 72 / 60 / 48 averaged over the layers, each row's own
  # average at most the budget and within one keep step of it.
  confs, unreachable = demo.configurations(144, 8)
  assert not unreachable and len(confs) == 16
  by = {(c["method"], c["budget"]): [str(st) for st in c["schedule"]] for c in confs}
  assert by["entropy", 48] == ["entropy@2:16"] and by["fastv", 60] == ["fastv@2:32"]
  assert by["random", 72] == ["random@2:48"]          # the scored methods' layer and keep
  assert by["divprune", 60] == ["divprune@0:60"]
  assert by["divprune+random", 48] == ["divprune@0:71", "random@5:9"]   # 13% of 71, at round(5)
  for c in confs[1:]:
    avg = schedule.average_visual(c["schedule"], 8)
    # one keep more adds 6/8 (K = 2), 1/8 (divprune) or at most 5/8 + 3/8 (the mix) tokens
    assert c["budget"] - 1 < avg <= c["budget"], (c, avg)


def test_budgets_out_of_reach_are_listed_not_moved():
  confs, unreachable = demo.configurations(16, 2)    # K = 1 alone averages 8 of 16 tokens
  assert {c["method"] for c in confs} == {"unpruned", "divprune", "divprune+random"}
  assert "entropy at 8 of 16 (2 layers)" in unreachable and len(unreachable) == 9


def test_demo_end_to_end(tmp_path, monkeypatch, capsys, fast_compile):
  monkeypatch.setenv("JAXMM_CACHE", str(tmp_path / "cache"))
  # 6 decoder layers, so that the scored methods (at K = 2) can meet two of the budgets.
  tc = dataclasses.replace(vlm.tiny(), text_layers=6)
  folder = vlm.ensure_model(tmp_path / "cache", tc, progress=False)
  out = tmp_path / "results"
  assert module_main("jaxmm.demo", ["--preset", "tiny", "--model", str(folder), "--images", "2",
                                    "--runs", "1", "--results", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "total wall time" in printed and "skipped: entropy at 5 of 16" in printed
  assert len(list((tmp_path / "cache").glob("digits-vqa-test-*/images/*.png"))) == 2
  res = json.loads((out / "demo.json").read_text())
  assert res["questions"] == 6 and res["flops_convention"] == "B" and res["n_text"] > 0
  rows = res["rows"]
  assert len(rows) == 1 + 2 * 3 + 2 * 3 and all(set(r) >= ROW_FIELDS for r in rows)
  assert len(res["unreachable"]) == 3          # entropy, fastv, random at 5 of 16
  assert set(rows[0]["accuracy_pct"]) == {"cell", "count", "presence"}
  assert rows[0]["method"] == "unpruned" and rows[0]["retention_pct"] == 100
  assert rows[0]["flops_reduction_pct"] == 0 and rows[0]["latency_ratio"] == 1
  assert all(r["flops_reduction_pct"] > 0 and r["latency_ratio"] > 0 for r in rows[1:])
  for r in rows:
    randomised = r["method"] in ("random", "divprune+random")
    assert r["average_visual"] <= r["budget"]
    assert (r["seeds"] == [0, 1, 2]) if randomised else r["seeds"] is None
    if randomised:   # the mean and sample std of the three draws
      per = r["overall_per_seed_pct"]
      assert r["overall_pct"] == pytest.approx(sum(per) / 3)
      assert r["overall_std_pct"] == pytest.approx(statistics.stdev(per))
  for method in demo.METHODS:
    mine = [r for r in rows if r["method"] == method]
    assert [r["budget"] for r in mine] == ([8, 7, 5] if "divprune" in method else [8, 7])
    red = [r["flops_reduction_pct"] for r in mine]
    assert red == sorted(red), (method, red)    # more as the budget shrinks
  assert rows[0]["ink_kept_pct"] == 100
  for r in (next(r for r in rows if r["method"] == m) for m in ("entropy", "divprune")):
    assert r["ink_kept_pct"] == pytest.approx(_ink_kept_by_hand(folder, tmp_path / "cache", r))
  assert (out / "demo_accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporaries left


def _ink_kept_by_hand(folder, cache, row) -> float:
  """% of the ink patches (any non-black pixel in the PNG) among the row's kept visual tokens."""
  split = next(cache.glob("digits-vqa-test-*"))
  qs = [json.loads(line) for line in (split / "questions.jsonl").read_text().splitlines()]
  m = jaxmm.load(folder)
  p = m.config.vision.patch_size
  x = demo.timing_batch(m, {"questions": split / "questions.jsonl", "images": split / "images"},
                        len(qs))
  kept = np.asarray(jaxmm.forward(m, schedule=row["schedule"], **x).kept[0])
  hits = total = 0
  for q, ids, k in zip(qs, x["input_ids"], kept):
    img = np.asarray(Image.open(split / "images" / q["image"]).convert("L"))
    ink = img.reshape(img.shape[0] // p, p, -1, p).max((1, 3)).reshape(-1) > 0
    vis = [int(i) for i in np.flatnonzero(ids == m.config.image_token_id)]
    hits += sum(ink[vis.index(int(j))] for j in k if j >= 0)
    total += ink.sum()
  return 100 * hits / total


def test_the_spread_note_is_printed_only_for_the_preset_its_table_was_trained_with(capsys):
  # docs/demo_seeds.json is the README's multi-model table of make demo's own preset.
  assert json.loads(demo.SEEDS_SUMMARY.read_text())["preset"] == demo.PRESET
  demo.print_spread_note(demo.PRESET)
  assert f"models of the {demo.PRESET!r} preset" in capsys.readouterr().out
  demo.print_spread_note("tiny")
  assert capsys.readouterr().out == ""
