"""jaxmm as an lmms-eval model (`jaxmm.eval.lmms`): the real `python -m lmms_eval` command line
offline on a tiny converted LLaVA and the digits_vqa task, against `jaxmm eval vqa` and
`jaxmm prune-bench`; loglikelihood against `jaxmm.forward`; multi-round generation; LLaVA-NeXT
and Qwen2-VL folders; and the errors of bad model_args.

lmms-eval is the optional extra `[lmms]` (`make test` installs it): missing, these tests fail
under CI=true and skip elsewhere.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jaxmm
from jaxmm import cli, flops
from jaxmm.converters.cli import convert_folder
from jaxmm.data import digits_vqa, prompts
from jaxmm.errors import JaxmmError
from jaxmm.eval import vqa as eval_vqa
from jaxmm.models import core
from jaxmm.pruning import schedule as schedule_lib
from jaxmm.train import vlm
from tiny_hf import build_hf_folder

try:
  from lmms_eval.api.instance import Instance
  from lmms_eval.models import get_model
except ImportError as e:
  if os.environ.get("CI", "").lower() == "true":
    raise
  pytest.skip(f"lmms-eval is not installed (pip install -e '.[lmms]'): {e}",
              allow_module_level=True)

SCHEDULE = "divprune@0:16"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A tiny converted LLaVA (CLIP 56 px / patch 7: 64 visual tokens, 2 decoder layers), a
  digits-VQA split of 4 images (12 questions) and its lmms-eval task folder."""
  d = tmp_path_factory.mktemp("lmms")
  build_hf_folder(d / "hf")
  convert_folder(d / "hf", d / "model")
  digits_vqa.write_split(vlm.tiny().data, d / "split", "test", n_images=4, seed=0)
  assert cli.main(["eval", "lmms-task", "--questions", str(d / "split" / "questions.jsonl"),
                   "--image-folder", str(d / "split" / "images"), "--answer-key",
                   str(d / "split" / "answers.jsonl"), "--out", str(d / "tasks")]) == 0
  return d


def lmms_eval(d: Path, out: str, model_args: str) -> subprocess.CompletedProcess:
  """`python -m lmms_eval` on the task folder, offline, with --log_samples."""
  env = {**os.environ, **OFFLINE, "HF_HOME": str(d / "hf_home")}
  cmd = [sys.executable, "-m", "lmms_eval", "--model", "jaxmm", "--model_args", model_args,
         "--include_path", str(d / "tasks"), "--tasks", "digits_vqa", "--batch_size", "4",
         "--output_path", str(d / out), "--log_samples"]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def results_of(folder: Path) -> tuple[dict, list]:
  """(the results JSON, the logged samples) of one run's output folder."""
  files = list(folder.rglob("*_results.json"))
  assert len(files) == 1, f"no results file under {folder}"
  samples = list(folder.rglob("*_samples_digits_vqa.jsonl"))[0].read_text().splitlines()
  return json.loads(files[0].read_text()), [json.loads(s) for s in samples]


def test_cli_scores_as_eval_vqa_and_records_prune_bench_flops(root, tmp_path):
  d = root
  proc = lmms_eval(d, "out", f"pretrained={d / 'model'},schedule={SCHEDULE},max_new_tokens=2")
  res, samples = results_of(d / "out")   # lmms-eval exits 0 even when a run fails
  scores = res["results"]["digits_vqa"]
  split = d / "split"
  want = eval_vqa.evaluate(d / "model", split / "questions.jsonl", split / "images",
                           answer_key=split / "answers.jsonl", schedule=SCHEDULE, batch_size=4,
                           max_new_tokens=2, progress=False, answers_file=tmp_path / "a.jsonl")
  assert scores["overall,none"] == want["overall"], proc.stderr[-2000:]
  for cat, acc in want["per_category"].items():
    assert scores[f"{cat},none"] == acc
  answers = [json.loads(l)["text"] for l in (tmp_path / "a.jsonl").read_text().splitlines()]
  assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == answers
  # The efficiency record: prune-bench's FLOPs and layer-averaged visual tokens, same prompts.
  rows = [json.loads(l) for l in (split / "questions.jsonl").read_text().splitlines()]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(
      {"image": str(split / "images" / r["image"]), "text": r["text"]}) + "\n" for r in rows))
  assert cli.main(["prune-bench", "--model", str(d / "model"), "--prompts",
                   str(tmp_path / "p.jsonl"), "--schedules", SCHEDULE, "--runs", "5",
                   "--out", str(tmp_path / "bench.json")]) == 0
  bench = json.loads((tmp_path / "bench.json").read_text())
  pruned, tp = bench["schedules"][1], res["throughput"]
  assert tp["avg_requests"] == len(rows) == bench["batch"]
  assert tp["avg_prefill_flops"] == pytest.approx(pruned["flops"] / bench["batch"], rel=1e-12)
  assert tp["avg_visual_per_layer"] == pytest.approx(pruned["average_visual"], rel=1e-12)
  assert tp["avg_prefill_flops_unpruned"] == pytest.approx(
      bench["schedules"][0]["flops"] / bench["batch"], rel=1e-12)
  m = jaxmm.load(d / "model")
  gqa = flops.batch_flops(schedule_lib.parse(SCHEDULE), bench["n_text_counted"],
                          bench["visual_tokens"], flops.Dims.from_config(m.config), "gqa")
  assert tp["avg_prefill_flops_gqa"] == pytest.approx(np.mean(gqa), rel=1e-12)
  assert 0 < tp["avg_compiles"] and 0 < tp["avg_kv_cache_bytes"]
  assert tp["avg_prefill_batch_median_s"] > 0 and tp["avg_decode_token_median_s"] > 0


def test_cli_reports_bad_model_args_and_writes_no_results(root):
  proc = lmms_eval(root, "bad", f"pretrained={root / 'model'},temperature=0")
  assert "unknown jaxmm model_args key(s) temperature" in proc.stdout + proc.stderr
  assert not list((root / "bad").rglob("*_results.json"))


@pytest.mark.parametrize("model_args,message", [
    ("pretrained=M,beams=2", "unknown jaxmm model_args key(s) beams; known: pretrained,"),
    ("pretrained=NOT", "is not a jaxmm model folder"),
    ("pretrained=M,schedule=divprune@0", "schedule stage 'divprune@0' is malformed"),
    ("pretrained=M,schedule=divprune@0:9,random@1:3", "are not KEY=VALUE pairs; quote"),
    ("pretrained=M,positions=compact", "positions= needs schedule="),
    ("pretrained=M,batch_size=auto", "batch_size must be a whole number >= 1"),
])
def test_bad_model_args_are_one_line_errors(root, tmp_path, model_args, message):
  (tmp_path / "NOT").mkdir()
  args = model_args.replace("=M", f"={root / 'model'}").replace("=NOT", f"={tmp_path / 'NOT'}")
  with pytest.raises(JaxmmError) as e:
    get_model("jaxmm").create_from_arg_string(args, {"batch_size": "1", "device": None})
  assert message in str(e.value) and "\n" not in str(e.value)


def instances(kind: str, args: list) -> list:
  return [Instance(request_type=kind, arguments=a, idx=0,
                   metadata={"task": "t", "doc_id": a[-3], "repeats": 1}) for a in args]


def digit_docs(d: Path, n: int) -> list[dict]:
  rows = [json.loads(l) for l in (d / "tasks" / "docs.jsonl").read_text().splitlines()]
  return rows[:n]


def visual(doc) -> list:
  with Image.open(doc["image"]) as im:
    return [im.convert("RGB")]


@pytest.mark.parametrize("schedule", [None, SCHEDULE])
def test_loglikelihood_is_the_sum_of_forward_log_probabilities(root, schedule):
  model_args = f"pretrained={root / 'model'},batch_size=2"
  model_args += f",schedule={schedule}" if schedule else ""
  lm = get_model("jaxmm").create_from_arg_string(model_args, {"batch_size": "1"})
  docs = digit_docs(root, 3)
  lm.task_dict = {"t": {"test": docs}}
  conts = [" 7", " yes no", " 3 4 5"]
  got = lm.loglikelihood(instances("loglikelihood", [
      (docs[i]["text"], conts[i], visual, i, "t", "test") for i in range(3)]))
  m, pr = jaxmm.load(root / "model"), prompts.Prompter(root / "model")
  for i, (logp, greedy) in enumerate(got):   # each request alone, unpadded
    prompt = pr.text(docs[i]["text"])
    inputs = pr.inputs(visual(docs[i]), [prompt + conts[i]], multiple=1)
    n = len(pr.tok(prompt + conts[i])["input_ids"]) - len(pr.tok(prompt)["input_ids"])
    logits = np.asarray(jaxmm.forward(m, schedule=schedule, **inputs).logits[0], np.float64)
    rows, target = logits[-n - 1:-1], inputs["input_ids"][0, -n:]
    lp = rows - np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - rows.max(-1, keepdims=True)
    assert n >= 1 and logp == pytest.approx(lp[np.arange(n), target].sum(), abs=1e-5)
    assert greedy == bool((rows.argmax(-1) == target).all())


def test_multi_round_asks_the_task_after_each_round(root):
  lm = get_model("jaxmm").create_from_arg_string(
      f"pretrained={root / 'model'},batch_size=2,max_new_tokens=3", {})
  docs = digit_docs(root, 3)
  lm.task_dict = {"t": {"test": docs}}
  follow = "what digit is this ?"

  def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
    done = round_idx == 2
    return (None if done else visual(doc)), follow, done, previous_output, round_idx

  got = lm.generate_until_multi_round(instances("generate_until_multi_round", [
      (docs[i]["text"], {"until": []}, visual, doc_to_text, i, "t", "test") for i in range(3)]))
  assert [len(g) for g in got] == [2, 2, 2]
  for r, texts in enumerate(([d["text"] for d in docs], [follow] * 3)):   # batched as a round
    single = lm.generate_until(instances("generate_until", [
        (t, {"until": []}, visual, i, "t", "test") for i, t in enumerate(texts)]))
    assert [g[r] for g in got] == [s.text for s in single]


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_other_families_answer_as_eval_vqa(family, tmp_path):
  import test_family_clis as fam
  (fam._next_folder if family == "llava_next" else fam._qwen_folder)(tmp_path / "hf")
  convert_folder(tmp_path / "hf", tmp_path / "model")
  rng = np.random.default_rng(0)
  docs = []
  for i, (h, w) in enumerate(fam.SIZES[family]):   # two image sizes: two visual-token counts
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    docs.append({"question_id": i, "image": f"{i}.png", "text": fam.QUESTIONS[i],
                 "path": str(tmp_path / f"{i}.png")})
  sched = schedule_lib.parse("entropy@1:50%")
  lm = get_model("jaxmm").create_from_arg_string(
      f"pretrained={tmp_path / 'model'},schedule=entropy@1:50%,batch_size=2", {})
  lm.task_dict = {"t": {"test": docs}}
  by_path = lambda doc: visual({"image": doc["path"]})
  got = lm.generate_until(instances("generate_until", [
      (d["text"], {"until": [], "max_new_tokens": 4}, by_path, i, "t", "test")
      for i, d in enumerate(docs)]))
  m = jaxmm.load(tmp_path / "model")
  want, _, _ = eval_vqa.answer_all(m, docs, tmp_path, schedule=sched, batch_size=2,
                                   max_new_tokens=4, progress=False)
  assert [g.text for g in got] == [w["text"] for w in want]
  pr = prompts.Prompter(tmp_path / "model")
  counts = [int(core.prepare(family, m.config, pr.inputs(by_path(d), [pr.text(d["text"])]))
                .visual_B[0]) for d in docs]
  assert counts[0] != counts[1] and lm.stats.record()["visual_tokens"] == np.mean(counts)


def test_text_only_prompts_reach_the_processor_without_images(root):
  pr = prompts.Prompter(root / "model")
  enc = pr.inputs([], ["USER: What is 2 + 2? ASSISTANT:"])
  assert set(enc) == {"input_ids", "attention_mask"} and enc["input_ids"].shape[1] % 8 == 0
