"""`jaxmm eval digits-da` over several runs: per-run accuracies and the mean/std table over seeds."""
import argparse
import json

import numpy as np
import pytest

from jaxmm.eval import digits_da
from jaxmm.cadit import config, evaluate, loop
from jaxmm.data import digits


def _row(task, seed, acc, **changes):
  cfg = config.digits_cpu().override([f"{k}={v}" for k, v in changes.items()])
  return {"task": task, "seed": seed, "config": cfg.to_dict(), "target_acc": acc,
          "iterations": 2200, "wall_s": 100.0 * (seed + 1)}


def test_summary_groups_seeds_and_names_ablations_by_their_changes():
  rows = [_row("usps-mnist", 0, 0.80), _row("usps-mnist", 1, 0.90), _row("usps-mnist", 2, 0.85),
          _row("mnist-usps", 0, 0.70), _row("usps-mnist", 0, 0.60, use_sp="false"),
          _row("usps-mnist", 0, 0.75, method="dann")]
  got = {(g["task"], g["method"], g["changes"]): g for g in evaluate.summarize(rows)}
  assert sorted(got) == [("mnist-usps", "cadit", ""), ("usps-mnist", "cadit", ""),
                         ("usps-mnist", "cadit", "use_sp=False"), ("usps-mnist", "dann", "")]
  main = got["usps-mnist", "cadit", ""]
  assert main["seeds"] == [0, 1, 2] and main["preset"] == "digits-cpu"
  assert main["target_acc_mean"] == pytest.approx(0.85)
  assert main["target_acc_std"] == pytest.approx(0.05)  # sample std of .80 .90 .85
  assert main["wall_s_mean"] == pytest.approx(200.0) and main["iterations_mean"] == 2200
  assert got["usps-mnist", "cadit", "use_sp=False"]["target_acc_std"] == 0.0
  assert "label_flip_rate_mean" not in main  # only averaged when every run has it


def test_printed_table_shows_a_spread_only_for_several_seeds(capsys):
  rows = [_row("usps-mnist", 0, 0.80), _row("usps-mnist", 1, 0.90),
          _row("usps-mnist", 0, 0.60, use_sp="false")]
  digits_da._print_summary(evaluate.summarize(rows))
  lines = {ln.split()[2]: ln for ln in capsys.readouterr().out.splitlines()[2:]}
  assert "85.0 ± 7.1" in lines["-"]  # sample std of .80 .90
  assert " 60.0 " in lines["use_sp=False"] and "±" not in lines["use_sp=False"]


def test_markdown_tables_put_methods_side_by_side_with_cadit_margins():
  rows = [_row("usps-mnist", 1, 0.90), _row("usps-mnist", 0, 0.80),
          _row("usps-mnist", 0, 0.60, method="source-only"),
          _row("usps-mnist", 1, 0.70, method="source-only"),
          _row("usps-mnist", 0, 0.75, method="dann"), _row("usps-mnist", 0, 0.5, use_cc="false")]
  for r, flip in zip(rows[:2], (0.04, 0.02)):
    r["label_flip_rate"] = flip
  lines = digits_da.markdown(rows, evaluate.summarize(rows)).splitlines()
  assert lines[0].startswith("| task | seeds | source-only | DANN | CADIT |")
  assert lines[2] == "| USPS -> MNIST | 2 | 65.0 ± 7.1 | 75.0 | 85.0 ± 7.1 | +20.0 | +10.0 | 3.0 |"
  assert lines[3] == "| USPS -> MNIST (use_cc=False) | 1 | - | - | 50.0 | - | - | - |"
  per_run = {ln.split(" | ")[1]: ln for ln in lines[5:]}
  assert per_run["cadit"] == "| USPS -> MNIST | cadit | 80.00 / 90.00 | 2.0 / 4.0 | 2200 | 100 / 200 |"
  assert per_run["cadit (use_cc=False)"].startswith("| USPS -> MNIST | cadit (use_cc=False) | 50.00 | - |")


def test_cli_over_two_seeds_recomputes_accuracy_and_reads_run_cost(tmp_path, capsys):
  r = np.random.default_rng(0)
  npz = {}
  for name in ("s", "t"):
    npz[name] = tmp_path / f"{name}.npz"
    np.savez(npz[name], x_train=r.integers(0, 256, (40, 12, 12), dtype=np.uint8),
             y_train=r.integers(0, 10, 40), x_test=r.integers(0, 256, (20, 12, 12), dtype=np.uint8),
             y_test=r.integers(0, 10, 20))
  cfg = config.tiny()
  source = digits.load_npz(npz["s"], cfg.image_size)
  target = digits.load_npz(npz["t"], cfg.image_size)
  trained = [loop.train(loop.RunSpec(cfg, "usps-mnist", seed), source, target, tmp_path / f"r{seed}",
                        fast_compile=True, log=lambda _: None) for seed in (0, 1)]
  args = argparse.Namespace(model=[str(tmp_path / "r0"), str(tmp_path / "r1" / "model")],
                            task=None, source_npz=str(npz["s"]), target_npz=str(npz["t"]),
                            out=str(tmp_path / "table.json"), markdown=True)
  assert digits_da.run(args) == 0
  out = json.loads((tmp_path / "table.json").read_text())
  for run, want in zip(out["runs"], trained):
    assert run["target_acc"] == want["target_acc"] and run["wall_s"] == want["wall_s"]
    assert run["label_flip_rate"] == want["label_flip_rate"]
  (group,) = out["summary"]
  assert group["seeds"] == [0, 1] and group["preset"] == "tiny" and group["changes"] == ""
  assert group["target_acc_mean"] == pytest.approx(np.mean([t["target_acc"] for t in trained]))
  printed = capsys.readouterr().out
  assert "± " in printed and "| task | method | target acc % by seed |" in printed
