"""`jaxmm calibrate` end to end on tiny digits LLaVAs: the scored stage lands on a planted
Entropy Collapse Layer, the random stage on the measured horizon, the keeps meet the budget,
the file is deterministic and works as `--schedule @FILE`; bad inputs are one-line errors."""
import dataclasses
import json

import jax.numpy as jnp
import pytest
from PIL import Image

from jaxmm.analysis import ecl, horizon
from jaxmm.cli import main
from jaxmm.data import digits_vqa
from jaxmm.errors import InputError
from jaxmm.eval import vqa as eval_vqa
from jaxmm.pruning import schedule as schedule_lib
from jaxmm.train import vlm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Question files and a 6-layer tiny LLaVA whose layer-2 heads all equal head 0: the token
  entropy collapses at layer 2 (as in test_analyze_cli)."""
  d = tmp_path_factory.mktemp("cal")
  images, _ = digits_vqa.make_split(vlm.tiny().data, "test", 3, seed=0)
  for i, img in enumerate(images):
    Image.fromarray(img).convert("RGB").save(d / f"img{i}.png")
  texts = ["Is there a 3 in the grid?", "How many times does 1 appear in the grid?",
           "What digit is in row 1 and column 2 of the grid?"]
  qs = [{"question_id": i, "image": f"img{i}.png", "text": t} for i, t in enumerate(texts)]
  key = [{"question_id": 0, "answer": "yes", "category": "presence"},
         {"question_id": 1, "answer": "2", "category": "count"},
         {"question_id": 2, "answer": "7", "category": "cell"}]
  (d / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
  (d / "key.jsonl").write_text("".join(json.dumps(k) + "\n" for k in key))
  run = vlm.Run(dataclasses.replace(vlm.tiny(), text_layers=6, text_heads=4))
  attn = run.state["params"]["llm"]["layers"]["attn"]
  q = 0.05 * attn["q"]["kernel"]
  attn["q"]["kernel"] = q.at[2].set(jnp.tile(q[2][:, :run.cfg.text.head_dim],
                                              (1, run.cfg.text.num_heads)))
  return d, run.save_model(d / "collapsed")


def _args(d, model, out, *extra):
  return ["calibrate", "--model", str(model), "--questions", str(d / "q.jsonl"),
          "--image-folder", str(d), "--out", str(out), *extra]


def test_schedule_follows_the_measured_layers_and_meets_the_budget(setup, capsys):
  d, model = setup
  assert main(_args(d, model, d / "s.json", "--budget", "50%", "--answer-key",
                    str(d / "key.jsonl"), "--no-search")) == 0
  res = json.loads((d / "s.json").read_text())
  assert "schedule:" in capsys.readouterr().out
  meas = res["measurements"]
  # The rules, re-applied to the written measurements, pick the layers the schedule uses.
  assert ecl.ecl_layer(meas["ecl"]["mean_token_entropy"]) == meas["ecl"]["ecl_layer"] == 2
  per_cat = meas["horizon"]["per_category"]
  hs = [horizon.horizon_layer(meas["horizon"]["layers"], c["mean_abs"], 0.05)
        for c in per_cat.values()]
  assert hs == [c["horizon"] for c in per_cat.values()]
  sched = schedule_lib.parse(res["schedule"])
  assert sched[0].method == "entropy" and sched[0].layer == 2
  late = None if None in hs else max(hs)
  if late is not None and late > 2:
    assert sched[1].method == "random" and sched[1].layer == late
  else:
    assert len(sched) == 1
  # keeps: the largest first keep whose layer average is at most 50% of the 16 visual tokens
  assert res["visual_tokens"] == 16 and res["budget_tokens"] == 8.0
  assert schedule_lib.solve_keep(res["template"], 8.0, 16, 6) == schedule_lib.resolve(sched, 16, 6)
  assert res["average_visual"] <= 8.0
  assert {c["rule"] for c in res["choices"]} == {"ecl", "horizon"}
  assert "jaxmm's own" in res["definitions"]["horizon"]


def test_layer_rules():
  from jaxmm.eval.calibrate import choose
  assert choose("entropy", 2, {"all": 4})[0] == "entropy@2:?,random@4:13%"   # no categories
  # the latest *category* horizon; the pooled "all" entry is not a category
  assert choose("entropy", 2, {"all": 6, "cell": 4, "count": 3})[0] == "entropy@2:?,random@4:13%"
  assert choose("entropy", 2, {"all": 4, "count": None})[0] == "entropy@2:?"  # count never
  assert choose("entropy", 3, {"all": 3})[0] == "entropy@3:?"      # no horizon after the stage
  assert choose("fastv", 0, {"all": 5})[0] == "fastv@1:?,random@5:13%"   # FastV's lowest K
  template, why = choose("divprune", 4, {"all": 2})
  assert template == "divprune@0:?,random@2:13%" and why[0]["rule"] == "reference"


def test_search_keeps_the_most_accurate_measured_candidate(setup):
  d, model = setup
  assert main(_args(d, model, d / "s2.json", "--budget", "50%", "--answer-key",
                    str(d / "key.jsonl"))) == 0
  res = json.loads((d / "s2.json").read_text())
  tried = [t for t in res["search"] if "accuracy" in t]
  assert tried and res["search"][0]["template"].startswith("entropy@2:?")   # the rule's first
  best = max(t["accuracy"] for t in tried)
  winner = next(t for t in tried if t["accuracy"] == best)      # ties: the earliest candidate
  assert res["schedule"] == winner["schedule"]
  assert {c["rule"] for c in res["choices"]} == {"calibration accuracy"}
  # the candidates come from the measurements: layers ECL-1..ECL+1, horizons, the reference's
  layers = {int(t["template"].split("@")[1].split(":")[0]) for t in res["search"]}
  assert layers <= {1, 2, 3}
  # each candidate's accuracy is what eval vqa scores for its schedule on these questions
  t = tried[-1]
  got = eval_vqa.evaluate(model, d / "q.jsonl", d, d / "key.jsonl", schedule=t["schedule"],
                          progress=False, max_new_tokens=2)
  assert got["overall"] == t["accuracy"]


def test_auto_takes_the_most_accurate_method(setup, capsys):
  d, model = setup
  key = ["--answer-key", str(d / "key.jsonl")]
  got = {}
  for method in ("entropy", "fastv", "divprune", "auto"):
    assert main(_args(d, model, d / f"{method}.json", "--budget", "50%", "--method", method,
                      *key)) == 0
    got[method] = json.loads((d / f"{method}.json").read_text())
  best = max(got[m]["calibration_accuracy"] for m in ("entropy", "fastv", "divprune"))
  assert got["auto"]["calibration_accuracy"] == best
  first = next(m for m in ("entropy", "fastv", "divprune")
               if got[m]["calibration_accuracy"] == best)            # ties: entropy, fastv, ...
  assert got["auto"]["method"] == first and got["auto"]["schedule"] == got[first]["schedule"]
  assert main(_args(d, model, d / "x.json", "--budget", "50%", "--method", "auto")) == 2
  assert "needs --answer-key" in capsys.readouterr().err


def test_candidates_span_the_measured_layers():
  from jaxmm.eval.calibrate import candidates
  meas = {"num_layers": 8, "ecl": {"ecl_layer": 4},
          "horizon": {"per_category": {"all": {"horizon": 7}, "cell": {"horizon": 4},
                                       "count": {"horizon": None}}}}
  got = candidates("entropy", meas)
  assert got[0][:2] == (4, None)             # the rule: count never reaches it, no random stage
  assert {c[0] for c in got} == {3, 4, 5}
  assert {c[1] for c in got} == {None, 4, 5, 7}     # cell, the reference's round(5), pooled
  assert all(r is None or r > k for k, r, _ in got)
  assert {c[:2] for c in candidates("divprune", meas)} == {(0, None), (0, 4), (0, 5), (0, 7)}


def test_a_budget_below_the_ecl_floor_moves_the_scored_stage_earlier():
  from jaxmm.eval.calibrate import choose, solve
  # 8 layers, 144 tokens, ECL 4: layers 0-3 alone average 72 > 64, so the stage moves to the
  # latest layer that fits, 3 (K = 2 would fit too), and random at the horizon 6 keeps 13%.
  _, choices = choose("entropy", 4, {"cell": 6})
  sched = solve("entropy", choices, 64, 144, 8)
  assert [str(st) for st in sched] == ["entropy@3:24", "random@6:3"]   # (432 + 72 + 6) / 8
  assert schedule_lib.average_visual(sched, 8) <= 64
  assert choices[0]["layer"] == 3 and choices[0]["rule"] == "ecl+budget"
  assert "moved to layer 3" in choices[0]["reason"]
  _, choices = choose("entropy", 4, {"cell": None})
  with pytest.raises(InputError, match="unreachable"):     # layer 1 alone averages 18 > 16
    solve("entropy", choices, 16, 144, 8)


def test_deterministic_and_usable_as_a_schedule_file(setup, tmp_path):
  d, model = setup
  for out in ("a.json", "b.json"):
    assert main(_args(d, model, tmp_path / out, "--budget", "6", "--method", "fastv")) == 0
  a, b = ((tmp_path / f).read_text() for f in ("a.json", "b.json"))
  assert a == b and json.loads(a)["answers"] == "the model's own greedy answers"
  res = eval_vqa.evaluate(model, d / "q.jsonl", d, schedule=f"@{tmp_path / 'a.json'}",
                          progress=False)
  assert res["answered"] == 3
  assert schedule_lib.parse(f"@{tmp_path / 'a.json'}") == schedule_lib.parse(
      json.loads(a)["schedule"])


@pytest.mark.parametrize("extra,needle", [
    (["--budget", "0"], "must be above 0"),
    (["--budget", "17"], "exceeds the 16 visual tokens"),
    (["--budget", "lots"], "neither a count nor a percentage"),
    (["--budget", "0.5", "--method", "entropy"], "unreachable"),
])
def test_bad_inputs_are_one_line_errors(setup, tmp_path, capsys, extra, needle):
  d, model = setup
  assert main(_args(d, model, tmp_path / "s.json", *extra)) == 2
  err = capsys.readouterr().err.strip().splitlines()   # after the measurements' progress bars
  assert err[-1].startswith("error:") and needle in err[-1], err
  assert not (tmp_path / "s.json").exists()


def test_answer_key_must_match_the_questions(setup, tmp_path, capsys):
  d, model = setup
  (tmp_path / "k.jsonl").write_text(json.dumps({"question_id": 0, "answer": "yes"}) + "\n")
  assert main(_args(d, model, tmp_path / "s.json", "--budget", "8", "--answer-key",
                    str(tmp_path / "k.jsonl"))) == 2
  assert "no answer for question(s) [1, 2]" in capsys.readouterr().err


def test_a_missing_schedule_file_is_a_one_line_error(tmp_path):
  with pytest.raises(InputError, match="does not exist"):
    schedule_lib.parse(f"@{tmp_path / 'none.json'}")
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(InputError, match="no \"schedule\""):
    schedule_lib.parse(f"@{tmp_path / 'bad.json'}")


def test_calibration_sets_without_one_visual_count_are_refused(monkeypatch):
  from jaxmm.eval import analyze_crossover, calibrate
  for counts, needle in (({}, "hold no visual tokens"), ({0: 0, 1: 0}, "hold no visual tokens"),
                         ({0: 16, 1: 36}, "different visual-token counts [16, 36]")):
    monkeypatch.setattr(analyze_crossover, "visual_counts", lambda *a, counts=counts: counts)
    with pytest.raises(InputError, match=needle.replace("[", "\\[").replace("]", "\\]")):
      calibrate.visual_count(None, [], None, None)
