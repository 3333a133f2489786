"""`analyze ecl` and `analyze horizon` end to end on a tiny random digits LLaVA (2 questions)."""
import json

import pytest
from PIL import Image

from jaxmm.cli import module_main
from jaxmm.data import digits_vqa
from train import vlm


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


def test_analyze_ecl_writes_json_and_png(setup):
  d, model = setup
  args = ["--model", str(model), "--questions", str(d / "q.jsonl"), "--image-folder", str(d)]
  assert module_main("eval.analyze_ecl", args + ["--out", str(d / "ecl")]) == 0
  res = json.loads((d / "ecl" / "ecl.json").read_text())
  n_l = res["num_layers"]
  assert len(res["mean_token_entropy"]) == len(res["global_entropy"]) == n_l
  assert 1 <= res["ecl_layer"] <= max(1, n_l // 2) and res["questions"] == 2
  assert (d / "ecl" / "ecl.png").stat().st_size > 0


def test_analyze_horizon_writes_json_and_pngs(setup):
  d, model = setup
  args = ["--model", str(model), "--questions", str(d / "q.jsonl"), "--image-folder", str(d),
          "--answer-key", str(d / "key.jsonl"), "--out", str(d / "hz")]
  assert module_main("eval.analyze_horizon", args) == 0
  res = json.loads((d / "hz" / "horizon.json").read_text())
  assert set(res["categories"]) == {"all", "count", "presence"}
  assert res["categories"]["all"]["questions"] == 2
  assert len(res["categories"]["count"]["mean_abs"]) == len(res["layers"])
  assert res["seconds_per_question"] > 0
  for png in ("horizon_heatmap.png", "horizon_curves.png"):
    assert (d / "hz" / png).stat().st_size > 0
