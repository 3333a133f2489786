"""eval/calibrate_compare.py: the held-out split, the reference's fixed schedules at a budget,
and the verdict of calibrated against the best fixed schedule."""
import pytest

from jaxmm.errors import InputError
from jaxmm.eval import calibrate_compare as cc


def test_calibration_and_held_out_questions_share_no_image():
  rows = [{"question_id": i, "image": f"img{i // 3}.png"} for i in range(12)]   # 4 images
  cal, held = cc.split_by_image(rows, 1)
  assert [r["question_id"] for r in cal] == [0, 1, 2] and len(held) == 9
  assert not {r["image"] for r in cal} & {r["image"] for r in held}
  for bad in (0, 4):
    with pytest.raises(InputError, match="must be in \\[1, 3\\]"):
      cc.split_by_image(rows, bad)


def test_fixed_schedules_meet_the_budget_or_say_why():
  fixed = cc.fixed_schedules("entropy", 64, 144, 8)
  text = {n: [str(st) for st in s] for n, s in fixed.items()}
  assert text["fixed entropy@2"] == ["entropy@2:37"]            # floor((512 - 288) / 6)
  assert text["random@0"] == ["random@0:64"]
  assert text["fixed divprune+random"] == ["divprune@0:95", "random@5:12"]
  low = cc.fixed_schedules("fastv", 16, 144, 8)
  assert "unreachable" in low["fixed fastv@2"]                  # layer 1 alone averages 18
  assert "fixed divprune@2" not in cc.fixed_schedules("divprune", 16, 144, 8)


def _model(values: dict) -> dict:
  return {"results": {"64": {n: {"schedule": None if v is None else n, "overall": v}
                             for n, v in values.items()}}}


def test_calibrated_against_the_best_fixed_schedule_per_model():
  models = [_model({"calibrated entropy": c, "fixed entropy@2": f, "random@0": r,
                    "calibrated fastv": None})
            for c, f, r in ((70, 74, 50), (71, 73, 52), (69, 75, 49))]
  agg = cc.aggregate(models, ["64"], ["entropy", "fastv"])["64"]
  assert agg["rows"]["fixed entropy@2"]["mean"] == pytest.approx(74)
  assert agg["rows"]["fixed entropy@2"]["std"] == pytest.approx(1.0)
  v = agg["calibrated_vs_best_fixed"]["entropy"]
  assert v["best_fixed"] == "fixed entropy@2" and v["per_model"] == [-4, -2, -6]
  assert v["diff_mean"] == pytest.approx(-4) and v["worse_beyond_spread"]      # -4 vs std 2
  assert agg["calibrated_vs_best_fixed"]["fastv"]["diff_mean"] is None          # out of reach
  close = [_model({"calibrated entropy": c, "fixed entropy@2": f})
           for c, f in ((74, 73), (70, 74), (75, 75))]
  v = cc.aggregate(close, ["64"], ["entropy"])["64"]["calibrated_vs_best_fixed"]["entropy"]
  assert v["diff_mean"] == pytest.approx(-1) and not v["worse_beyond_spread"]
