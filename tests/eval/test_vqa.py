"""`jaxmm eval vqa` on a hand-written LLaVA question file (3 questions, 2 images)."""
import json
import re

import pytest
from PIL import Image

import jaxmm
from jaxmm.eval import vqa as eval_vqa
from jaxmm.cli import module_main
from jaxmm.data import digits_vqa
from jaxmm.errors import InputError
from jaxmm.generate_cli import answer
from jaxmm.train import vlm

ANSWER_FIELDS = {"question_id", "prompt", "text", "answer_id", "model_id"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A randomly initialised tiny digits LLaVA (16 px, 16 visual tokens) with its processor."""
  run = vlm.Run(vlm.tiny())
  return run.save_model(tmp_path_factory.mktemp("m") / "tiny-vlm")


@pytest.fixture
def files(tmp_path):
  images, _ = digits_vqa.make_split(vlm.tiny().data, "test", 2, seed=0)
  for i, img in enumerate(images):
    Image.fromarray(img).convert("RGB").save(tmp_path / f"img{i}.png")
  qs = [{"question_id": "a", "image": "img0.png", "text": "Is there a 3 in the grid?", "category": "presence"},
        {"question_id": 7, "image": "img1.png", "text": "How many times does 1 appear in the grid?"},
        {"question_id": "c", "image": "img0.png", "text": "What digit is in row 1 and column 2 of the grid?",
         "category": "cell"}]
  (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
  return tmp_path, qs


def test_answers_file_has_llava_fields_and_batched_answers_equal_single(model_dir, files):
  d, qs = files
  code = module_main("jaxmm.eval.vqa", ["--model", str(model_dir), "--questions", str(d / "q.jsonl"),
                                  "--image-folder", str(d), "--answers-file", str(d / "a.jsonl"),
                                  "--batch-size", "2"])  # a full batch, then a padded one
  assert code == 0
  lines = [json.loads(l) for l in (d / "a.jsonl").read_text().splitlines()]
  assert [l["question_id"] for l in lines] == ["a", 7, "c"]
  for l, q in zip(lines, qs):
    assert set(l) == ANSWER_FIELDS
    assert l["prompt"] == q["text"] and l["model_id"] == "tiny-vlm"
  # The shortest prompt is the most left padded one: alone, unpadded, it gives the same answer.
  m = jaxmm.load(model_dir)
  assert lines[0]["text"] == answer(m, qs[0]["text"], d / qs[0]["image"], max_new_tokens=8)
  assert len({l["answer_id"] for l in lines}) == 3


def test_scores_exact_match_per_category(model_dir, files):
  d, qs = files
  first = eval_vqa.evaluate(model_dir, d / "q.jsonl", d, batch_size=2, progress=False)
  assert "overall" not in first and first["answered"] == 3
  got = {l["question_id"]: l["text"] for l in
         eval_vqa.answer_all(jaxmm.load(model_dir), qs, d, batch_size=2, progress=False)[0]}
  key = [{"question_id": "a", "answer": got["a"].upper() + "."},      # normalised: still right
         {"question_id": 7, "answer": got[7] + "x", "category": "count"},
         {"question_id": "c", "answer": got["c"]}]
  (d / "key.jsonl").write_text("".join(json.dumps(k) + "\n" for k in key))
  res = eval_vqa.evaluate(model_dir, d / "q.jsonl", d, answer_key=d / "key.jsonl", batch_size=2,
                          progress=False)
  assert res["per_category"] == {"cell": 1.0, "count": 0.0, "presence": 1.0}
  assert res["overall"] == pytest.approx(2 / 3)


def test_missing_and_unreadable_images_are_reported_by_id(model_dir, files, capsys):
  d, qs = files
  qs = qs + [{"question_id": "gone", "image": "nope.png", "text": "Is there a 1 in the grid?"},
             {"question_id": "bad", "image": "bad.png", "text": "Is there a 2 in the grid?"}]
  (d / "bad.png").write_text("not an image")
  (d / "q2.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
  res = eval_vqa.evaluate(model_dir, d / "q2.jsonl", d, answers_file=d / "a.jsonl", batch_size=2,
                          progress=False)
  assert [e["question_id"] for e in res["errors"]] == ["gone", "bad"]
  err = capsys.readouterr().err
  assert "question gone:" in err and "question bad:" in err
  lines = [json.loads(l) for l in (d / "a.jsonl").read_text().splitlines()]
  assert [l["question_id"] for l in lines] == ["a", 7, "c"]


@pytest.mark.parametrize("line,msg", [("{not json", "malformed JSON"),
                                      ('["a list"]', "expected a JSON object"),
                                      ('{"question_id": 9, "text": "q"}', "missing field(s) ['image']")])
def test_malformed_line_names_its_number(model_dir, files, line, msg, capsys):
  d, qs = files
  text = json.dumps(qs[0]) + "\n\n" + line + "\n" + json.dumps(qs[1]) + "\n"
  (d / "bad.jsonl").write_text(text)
  with pytest.raises(InputError, match=re.escape("bad.jsonl:3: " + msg)):
    eval_vqa.evaluate(model_dir, d / "bad.jsonl", d, progress=False)
  code = module_main("jaxmm.eval.vqa", ["--model", str(model_dir), "--questions", str(d / "bad.jsonl"),
                                  "--image-folder", str(d), "--answers-file", str(d / "a.jsonl")])
  assert code == 2 and "bad.jsonl:3:" in capsys.readouterr().err
  assert not (d / "a.jsonl").exists()


def test_positions_override_reaches_every_stage(model_dir, files, capsys):
  from jaxmm.pruning import schedule as schedule_lib
  d, _ = files
  base = ["--model", str(model_dir), "--questions", str(d / "q.jsonl"), "--image-folder", str(d)]
  for pos in ("preserve", "compact"):
    assert module_main("jaxmm.eval.vqa", base + ["--answers-file", str(d / f"{pos}.jsonl"),
                                           "--schedule", "divprune@0:6", "--positions", pos]) == 0
    want = eval_vqa.evaluate(model_dir, d / "q.jsonl", d, progress=False,
                             schedule=schedule_lib.parse("divprune@0:6", positions=pos),
                             answers_file=d / f"want-{pos}.jsonl")
    assert want["answered"] == 3
    texts = lambda f: [json.loads(l)["text"] for l in f.read_text().splitlines()]
    assert texts(d / f"{pos}.jsonl") == texts(d / f"want-{pos}.jsonl")
  assert eval_vqa.parse_schedule("divprune@0:6", "preserve")[0].positions == "preserve"
  assert module_main("jaxmm.eval.vqa", base + ["--answers-file", str(d / "x.jsonl"),
                                         "--positions", "compact"]) == 2
  assert "--positions needs --schedule" in capsys.readouterr().err
