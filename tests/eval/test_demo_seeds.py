"""eval/demo_seeds.py: aggregation over trained models and which differences it claims."""
import pytest

from jaxmm.cli import module_main
from jaxmm.eval import demo_seeds


def _row(method, budget, overall, cell=None):
  acc = {"cell": cell if cell is not None else overall, "count": overall, "presence": overall}
  return {"method": method, "budget": budget, "schedule": f"{method}@2:{budget}",
          "average_visual": float(budget), "flops_reduction_pct": 50.0,
          "overall_pct": overall, "accuracy_pct": acc}


def _models():
  # three trained models; A beats B by 10, 12, 8 points (consistent); A vs C flips sign
  per = [(90, 80, 70, 85), (92, 78, 80, 76), (88, 72, 64, 60)]
  return [{"training_seed": s, "rows": [_row("unpruned", 144, u), _row("a", 48, a),
                                        _row("b", 48, b), _row("c", 48, c)]}
          for s, (u, a, b, c) in enumerate(per)]


def test_mean_and_sample_std_per_row():
  rows = demo_seeds.aggregate(_models())
  assert [r["method"] for r in rows] == ["unpruned", "a", "b", "c"]
  assert rows[1]["overall"]["mean"] == pytest.approx(230 / 3)
  assert rows[1]["overall"]["std"] == pytest.approx(4.163331998932265)   # stdev(80, 78, 72)
  assert rows[1]["overall_per_model"] == [80, 78, 72]
  summ = demo_seeds.summary(_models(), rows, "robust")
  assert summ["models"] == 3 and summ["unpruned_std"] == pytest.approx(2.0)
  assert summ["preset"] == "robust"


def test_only_same_sign_differences_beyond_their_spread_are_claimed():
  comps = {(c["a"], c["b"]): c for c in demo_seeds.comparisons(demo_seeds.aggregate(_models()))}
  assert set(comps) == {("a", "b"), ("a", "c"), ("b", "c")}      # same budget only, no unpruned
  assert comps["a", "b"]["per_model"] == [10, -2, 8]
  assert not comps["a", "b"]["consistent"]                          # one model disagrees
  assert comps["a", "c"]["per_model"] == [-5, 2, 12] and not comps["a", "c"]["consistent"]
  models = _models()
  models[1]["rows"][2]["overall_pct"] = 70                         # now a - b = 10, 8, 8
  ab = demo_seeds.comparisons(demo_seeds.aggregate(models))[0]
  assert ab["per_model"] == [10, 8, 8] and ab["consistent"]


def test_mismatched_configurations_are_refused():
  models = _models()
  models[2]["rows"][1]["budget"] = 60
  with pytest.raises(demo_seeds.InputError, match="configurations differ"):
    demo_seeds.aggregate(models)


def test_cli_needs_two_distinct_seeds(capsys):
  assert module_main("jaxmm.eval.demo_seeds", ["--seeds", "1", "1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "two distinct training seeds" in err[0]
