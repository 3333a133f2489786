"""`analyze ecl`, `analyze horizon` and `analyze crossover` end to end on a tiny random digits LLaVA."""
import dataclasses
import json

import jax.numpy as jnp

import numpy as np
import pytest
from PIL import Image

from jaxmm.cli import module_main
from jaxmm.data import digits_vqa
from jaxmm.train import vlm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("an")
  model = vlm.Run(vlm.tiny()).save_model(d / "tiny-vlm")
  images, _ = digits_vqa.make_split(vlm.tiny().data, "test", 2, seed=0)
  for i, img in enumerate(images):
    Image.fromarray(img).convert("RGB").save(d / f"img{i}.png")
  qs = [{"question_id": "a", "image": "img0.png", "text": "Is there a 3 in the grid?"},
        {"question_id": "b", "image": "img1.png", "text": "How many times does 1 appear in the grid?"}]
  key = [{"question_id": "a", "answer": "yes", "category": "presence"},
         {"question_id": "b", "answer": "2", "category": "count"}]
  (d / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
  (d / "key.jsonl").write_text("".join(json.dumps(k) + "\n" for k in key))
  return d, model


def test_analyze_ecl_finds_a_planted_collapse(setup, tmp_path):
  """6 decoder layers of 4 heads (the rule looks at layers 1-3); in layer 2 every head's query
  equals head 0's, so the centred per-head queries vanish and the token entropy collapses
  there. The queries are scaled down so that the reference's un-normalised entropy, which
  grows negative with query norms, sits in its positive range as well."""
  d, _ = setup
  run = vlm.Run(dataclasses.replace(vlm.tiny(), text_layers=6, text_heads=4))
  attn = run.state["params"]["llm"]["layers"]["attn"]
  heads, dh = run.cfg.text.num_heads, run.cfg.text.head_dim
  q = 0.05 * attn["q"]["kernel"]
  attn["q"]["kernel"] = q.at[2].set(jnp.tile(q[2][:, :dh], (1, heads)))
  model = run.save_model(tmp_path / "collapsed")
  args = ["--model", str(model), "--questions", str(d / "q.jsonl"), "--image-folder", str(d)]
  assert module_main("jaxmm.eval.analyze_ecl", args + ["--out", str(d / "ecl")]) == 0
  res = json.loads((d / "ecl" / "ecl.json").read_text())
  assert len(res["mean_token_entropy"]) == len(res["global_entropy"]) == 6
  for curve in (res["mean_token_entropy"], res["mean_token_entropy_trace_normalised"]):
    assert curve[2] < 1e-6 < min(curve[:2] + curve[3:])
  assert res["ecl_layer"] == res["ecl_layer_trace_normalised"] == 2 and res["questions"] == 2
  assert "jaxmm's own" in res["definitions"]["ecl_layer"]
  assert (d / "ecl" / "ecl.png").stat().st_size > 0


def test_analyze_horizon_writes_json_and_pngs(setup):
  d, model = setup
  args = ["--model", str(model), "--questions", str(d / "q.jsonl"), "--image-folder", str(d),
          "--answer-key", str(d / "key.jsonl"), "--out", str(d / "hz")]
  assert module_main("jaxmm.eval.analyze_horizon", args) == 0
  res = json.loads((d / "hz" / "horizon.json").read_text())
  assert set(res["categories"]) == {"all", "count", "presence"}
  assert res["categories"]["all"]["questions"] == 2
  assert len(res["categories"]["count"]["mean_abs"]) == len(res["layers"])
  assert res["seconds_per_question"] > 0
  for png in ("horizon_heatmap.png", "horizon_curves.png"):
    assert (d / "hz" / png).stat().st_size > 0


def test_analyze_crossover_sweeps_layers_against_random(setup):
  d, model = setup
  from jaxmm.eval import vqa as eval_vqa
  args = ["--model", str(model), "--questions", str(d / "q.jsonl"), "--image-folder", str(d),
          "--answer-key", str(d / "key.jsonl"), "--out", str(d / "cx"), "--method", "fastv",
          "--keep", "4", "--random-seeds", "2"]
  assert module_main("jaxmm.eval.analyze_crossover", args) == 0
  res = json.loads((d / "cx" / "crossover.json").read_text())
  assert res["layers"] == list(range(1, res["num_layers"])) and res["keep"] == 4
  ov = res["curves"]["overall"]
  assert len(ov["method"]) == len(ov["random_mean"]) == len(res["layers"])
  # Each point is exactly what `eval vqa` scores for that schedule (random: seed s, the
  # method's positions).
  k = res["layers"][-1]
  direct = eval_vqa.evaluate(model, d / "q.jsonl", d, d / "key.jsonl", schedule=f"fastv@{k}:4",
                             progress=False)
  assert ov["method"][-1] == direct["overall"]
  from jaxmm.pruning import schedule as schedule_lib
  rnd = [eval_vqa.evaluate(model, d / "q.jsonl", d, d / "key.jsonl", progress=False, seed=s,
                           schedule=schedule_lib.parse(f"random@{k}:4", positions="preserve"))
         for s in (0, 1)]
  assert ov["random_mean"][-1] == sum(r["overall"] for r in rnd) / 2
  # Each category's standard error counts that category's questions (1 each here), not all 2.
  assert ov["questions"] == 2 and res["curves"]["count"]["questions"] == 1
  c = res["curves"]["count"]
  p_m, r = c["method"][-1], np.array([x["per_category"]["count"] for x in res["raw"][-1]["random"]])
  want = np.sqrt(p_m * (1 - p_m) / 1 + r.var(ddof=1) / 2)
  np.testing.assert_allclose(c["standard_error"][-1], want)
  assert (d / "cx" / "crossover.png").stat().st_size > 0


@pytest.mark.parametrize("args, needle", [
    (["--keep", "0"], "keep"),
    (["--keep", "999"], "keep"),
    (["--layers", "0-1"], "layers must lie in"),
    (["--layers", "two"], "expected 'A-B'"),
    (["--random-seeds", "0"], "--random-seeds"),
])
def test_analyze_crossover_refuses_bad_settings(setup, capsys, args, needle):
  d, model = setup
  base = ["--model", str(model), "--questions", str(d / "q.jsonl"), "--image-folder", str(d),
          "--answer-key", str(d / "key.jsonl"), "--out", str(d / "bad")]
  assert module_main("jaxmm.eval.analyze_crossover", base + args) == 2
  assert needle in capsys.readouterr().err


def test_crossover_rule():
  from jaxmm.eval.analyze_crossover import crossover_layer
  layers = [1, 2, 3, 4, 5]
  method = [0.9, 0.8, 0.6, 0.5, 0.5]
  rand = np.array([[0.5, 0.55, 0.58, 0.5, 0.51], [0.5, 0.56, 0.6, 0.5, 0.49]])
  layer, adv, se = crossover_layer(layers, method, rand, n=400)
  np.testing.assert_allclose(adv, np.array(method) - rand.mean(0))
  want_se = np.sqrt(np.array(method) * (1 - np.array(method)) / 400 + rand.var(0, ddof=1) / 2)
  np.testing.assert_allclose(se, want_se)
  assert layer == 3                 # +1 point at layer 3 is within 2 se; so are 4 and 5
  # An advantage that comes back later moves the crossover past it.
  assert crossover_layer(layers, [0.9, 0.5, 0.5, 0.9, 0.5], rand, 400)[0] == 5
  # A method ahead to the end has no crossover.
  assert crossover_layer(layers, [0.9] * 5, rand, 400)[0] is None


def test_parse_layers_takes_ranges_lists_and_mixes():
  from jaxmm.eval.analyze_common import parse_layers
  assert parse_layers("1-3,6,9-10", 1, 12) == [1, 2, 3, 6, 9, 10]
  assert parse_layers("4,2,2", 1, 12) == [2, 4] and parse_layers(None, 2, 5) == [2, 3, 4]


def test_analyze_horizon_probes_only_the_chosen_layers(setup, tmp_path, capsys):
  d, _ = setup
  import dataclasses
  model = vlm.Run(dataclasses.replace(vlm.tiny(), text_layers=4)).save_model(tmp_path / "m4")
  args = ["--model", str(model), "--questions", str(d / "q.jsonl"), "--image-folder", str(d),
          "--answer-key", str(d / "key.jsonl")]
  assert module_main("jaxmm.eval.analyze_horizon", args + ["--out", str(tmp_path / "all")]) == 0
  assert module_main("jaxmm.eval.analyze_horizon", args + ["--out", str(tmp_path / "some"),
                                                     "--layers", "1,3"]) == 0
  full = json.loads((tmp_path / "all" / "horizon.json").read_text())
  some = json.loads((tmp_path / "some" / "horizon.json").read_text())
  assert full["layers"] == [1, 2, 3] and some["layers"] == [1, 3]
  for cat, s in some["categories"].items():   # a probe layer's information does not depend on
    f = full["categories"][cat]                # which other layers are probed
    np.testing.assert_allclose(s["mean_abs"], [f["mean_abs"][0], f["mean_abs"][2]], rtol=1e-6)
  assert module_main("jaxmm.eval.analyze_horizon", args + ["--out", str(tmp_path / "bad"),
                                                     "--layers", "2-3"]) == 2
  assert "must include layer 1" in capsys.readouterr().err
