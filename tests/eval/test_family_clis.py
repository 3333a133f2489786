"""The command lines on LLaVA-NeXT and Qwen2-VL folders: `jaxmm generate`, `eval vqa`,
`prune-bench`, `analyze ecl / horizon / crossover`.

Tiny random models saved with their own processor files (the LLaVA-NeXT processor of
tests/models/test_llava_next.py; a Qwen2-VL processor over a word-level tokenizer whose vision
tokens have the ids of tests/models/qwen_tiny.py), converted with `jaxmm convert`. Two images of
different sizes, so the two questions hold different visual-token counts and grids.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import jaxmm
from jaxmm import cli, flops, registry
from jaxmm.converters.cli import convert_folder
from jaxmm.data import processors
from jaxmm.models import core, llava_next
from jaxmm.pruning import schedule as schedule_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import qwen_tiny  # noqa: E402
import test_llava_next as next_tiny  # noqa: E402

FAMILIES = ["llava_next", "qwen2_vl"]
SIZES = {"llava_next": ((20, 30), (40, 12)), "qwen2_vl": ((32, 48), (48, 24))}
WORDS = ("a", "b", "c", "d")
QUESTIONS = ("a b c", "d a")


def _scale_weights(model) -> None:
  """Every weight random at a scale that keeps the logits O(1), so greedy answers vary."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * 0.3)


def _next_folder(hf: Path) -> None:
  from jaxmm.data.tokenizer import CHAT_TEMPLATE
  model, _, _ = next_tiny.tiny(seed=4)
  model.save_pretrained(hf)
  proc = next_tiny.processor()
  proc.chat_template = CHAT_TEMPLATE
  proc.save_pretrained(hf)


QWEN_TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _qwen_tokenizer():
  """A word-level tokenizer with the tiny Qwen config's special ids (vision tokens 98-101);
  every other id of its 120 is a word (w<id>), so that any generated id decodes to text."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(("<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:",
                                       *WORDS))}
  vision = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
            "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
  vocab.update(zip(vision.values(), (qwen_tiny.START, qwen_tiny.END, qwen_tiny.IMAGE,
                                     qwen_tiny.VIDEO)))
  vocab.update({f"w{i}": i for i in sorted(set(range(120)) - set(vocab.values()))})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                 chat_template=QWEN_TEMPLATE, extra_special_tokens=vision)


def _qwen_folder(hf: Path) -> None:
  """Saved as a hub folder is: tokenizer files and a preprocessor_config.json naming the
  processor class (whose video processor needs torchvision, which is not installed)."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  torch.manual_seed(0)
  model = qwen_tiny.Qwen2VLForConditionalGeneration(qwen_tiny.hf_config("qwen2_vl")).eval()
  _scale_weights(model)
  model.save_pretrained(hf)
  _qwen_tokenizer().save_pretrained(hf)
  Qwen2VLImageProcessorPil(patch_size=qwen_tiny.PATCH, temporal_patch_size=qwen_tiny.TEMPORAL,
                           merge_size=qwen_tiny.MERGE, min_pixels=16 * 16,
                           max_pixels=64 * 64).save_pretrained(hf)
  cfg = json.loads((hf / "preprocessor_config.json").read_text())
  (hf / "preprocessor_config.json").write_text(json.dumps({**cfg,
                                                           "processor_class": "Qwen2VLProcessor"}))


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
  """(family, folder dir): the converted model, img0/img1.png, q.jsonl, key.jsonl, p.jsonl."""
  family = request.param
  d = tmp_path_factory.mktemp(family)
  (_next_folder if family == "llava_next" else _qwen_folder)(d / "hf")
  convert_folder(d / "hf", d / "model")
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate(SIZES[family]):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
  qs = [{"question_id": f"q{i}", "image": f"img{i}.png", "text": t}
        for i, t in enumerate(QUESTIONS)]
  key = [{"question_id": "q0", "answer": "a", "category": "x"},
         {"question_id": "q1", "answer": "b", "category": "y"}]
  prompts = [{"image": f"img{i}.png", "text": t} for i, t in enumerate(QUESTIONS)]
  for name, recs in (("q.jsonl", qs), ("key.jsonl", key), ("p.jsonl", prompts)):
    (d / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
  return family, d


def _inputs(d: Path, i: int) -> dict:
  """The folder's own processor on question i alone (chat template, image), unpadded."""
  proc = processors.load_processor(d / "model")
  msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}]
  text = proc.apply_chat_template(msgs, add_generation_prompt=True)
  with Image.open(d / f"img{i}.png") as im:
    return dict(proc(images=[im.convert("RGB")], text=[text], return_tensors="np"))


def _expected_grids(family: str, m, inputs: dict) -> list[list[int]]:
  """The grids an image's size implies: LLaVA-NeXT's base and unpadded tile grid, Qwen2-VL's
  merged grid (h/2, w/2) of its patch grid."""
  if family == "llava_next":
    side = m.config.vision.image_size // m.config.vision.patch_size
    _, rows, _, cols = llava_next.unpadded_grid(m.config, inputs["image_sizes"][0])
    return [[side, side], [rows, cols]]
  _, h, w = inputs["image_grid_thw"][0]
  return [[int(h) // 2, int(w) // 2]]


def test_generate_prints_jaxmm_generate_on_the_processors_inputs(setup, capsys):
  family, d = setup
  m = jaxmm.load(d / "model")
  assert m.family == family
  base = ["generate", "--model", str(d / "model"), "--image", str(d / "img1.png"), "--prompt",
          QUESTIONS[1], "--max-new-tokens", "4"]
  assert cli.main(base) == 0
  out = capsys.readouterr().out.strip()
  inputs = _inputs(d, 1)
  tok = processors.load_processor(d / "model").tokenizer
  want = jaxmm.generate(m, max_new_tokens=4, **inputs)
  assert out == tok.decode(want[0], skip_special_tokens=True).strip() and out
  # With a schedule: the report counts the image's own visual tokens.
  assert cli.main(base + ["--schedule", "entropy@1:50%"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  n_vis = int(core.prepare(family, m.config, inputs).visual_B[0])
  assert lines[1] == f"visual tokens: {n_vis} at the input"
  assert lines[2] == f"  entropy@1: kept {schedule_lib.keep_count('50%', n_vis)}"


def test_eval_vqa_answers_batched_as_single(setup):
  family, d = setup
  from jaxmm.eval import vqa as eval_vqa
  from jaxmm.generate_cli import answer
  args = ["eval", "vqa", "--model", str(d / "model"), "--questions", str(d / "q.jsonl"),
          "--image-folder", str(d), "--answers-file", str(d / "a.jsonl"), "--batch-size", "2",
          "--max-new-tokens", "4"]
  assert cli.main(args) == 0
  lines = [json.loads(l) for l in (d / "a.jsonl").read_text().splitlines()]
  assert [l["question_id"] for l in lines] == ["q0", "q1"] and any(l["text"] for l in lines)
  m = jaxmm.load(d / "model")
  counts = [int(core.prepare(family, m.config, _inputs(d, i)).visual_B[0]) for i in (0, 1)]
  assert counts[0] != counts[1]       # different image sizes: different visual counts
  for i, l in enumerate(lines):       # alone and unpadded, each question answers the same
    assert l["text"] == answer(m, QUESTIONS[i], d / f"img{i}.png", max_new_tokens=4)
  res = eval_vqa.evaluate(m, d / "q.jsonl", d, answer_key=d / "key.jsonl", batch_size=1,
                          max_new_tokens=4, progress=False)
  assert res["answered"] == 2 and set(res["per_category"]) == {"x", "y"}


def test_prune_bench_counts_flops_per_prompt(setup, capsys):
  family, d = setup
  out = d / "bench.json"
  assert cli.main(["prune-bench", "--model", str(d / "model"), "--prompts", str(d / "p.jsonl"),
                   "--schedules", "entropy@1:50%", "--runs", "5", "--out", str(out),
                   "--show-kept", str(d / "img0.png"), "--show-out", str(d / "kept.png")]) == 0
  res = json.loads(out.read_text())
  m = jaxmm.load(d / "model")
  prepared = [core.prepare(family, m.config, _inputs(d, i)) for i in (0, 1)]
  vis = [int(p.visual_B[0]) for p in prepared]
  text = [int(p.text_B[0]) for p in prepared]
  assert res["visual_tokens"] == vis and res["n_text_counted"] == text and vis[0] != vis[1]
  dims = flops.Dims.from_config(m.config)
  for row, sched in zip(res["schedules"], ["", "entropy@1:50%"]):
    s = schedule_lib.parse(sched) if sched else ()
    want = flops.batch_flops(s, text, vis, dims, "B")
    assert row["flops"] == pytest.approx(float(np.mean(want)) * 2, rel=1e-12)
  assert res["schedules"][1]["flops_ratio"] < 1
  assert np.isfinite(res["schedules"][1]["max_logit_change"])
  assert (d / "kept.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_ecl_and_horizon_follow_each_images_grid(setup):
  family, d = setup
  common = ["--model", str(d / "model"), "--questions", str(d / "q.jsonl"), "--image-folder",
            str(d)]
  assert cli.main(["analyze", "ecl", *common, "--out", str(d / "ecl")]) == 0
  ecl = json.loads((d / "ecl" / "ecl.json").read_text())
  m = jaxmm.load(d / "model")
  assert ecl["questions"] == 2 and len(ecl["mean_token_entropy"]) == m.config.text.num_layers
  assert np.isfinite(ecl["mean_token_entropy"]).all()
  assert cli.main(["analyze", "horizon", *common, "--answer-key", str(d / "key.jsonl"),
                   "--layers", "1,2", "--out", str(d / "hz")]) == 0
  hz = json.loads((d / "hz" / "horizon.json").read_text())
  assert [q["question_id"] for q in hz["per_question"]] == ["q0", "q1"]
  for i, q in enumerate(hz["per_question"]):
    inputs = _inputs(d, i)
    grids = _expected_grids(family, m, inputs)
    assert q["grids"] == grids
    assert q["windows"] == sum((r // 2) * (c // 2) for r, c in grids)
    n_vis = int(core.prepare(family, m.config, inputs).visual_B[0])
    assert q["visual_tokens"] == n_vis
    assert q["visual_tokens_in_no_window"] == n_vis - 4 * q["windows"]
  assert hz["per_question"][0]["grids"] != hz["per_question"][1]["grids"]
  assert set(hz["categories"]) == {"all", "x", "y"} and hz["layers"] == [1, 2]


def test_analyze_crossover_runs(setup):
  family, d = setup
  assert cli.main(["analyze", "crossover", "--model", str(d / "model"), "--questions",
                   str(d / "q.jsonl"), "--image-folder", str(d), "--answer-key",
                   str(d / "key.jsonl"), "--out", str(d / "cx"), "--method", "fastv", "--keep",
                   "50%", "--layers", "1", "--random-seeds", "1", "--batch-size", "2",
                   "--max-new-tokens", "2"]) == 0
  res = json.loads((d / "cx" / "crossover.json").read_text())
  counts = [q["visual_tokens"] for q in res["visual_tokens_per_question"]]
  assert res["keep"] == "50%" and res["visual_tokens"] == max(counts) and len(set(counts)) == 2
  assert res["layers"] == [1] and res["questions_scored"] == 2


def test_visual_grids_hold_each_visual_token_once(setup):
  """The family's grids are disjoint visual slots; the visual tokens outside them are exactly
  LLaVA-NeXT's newlines (Qwen2-VL's grids cover every visual token)."""
  family, d = setup
  m = jaxmm.load(d / "model")
  fam = registry.family_module(family)
  for i in (0, 1):
    inputs = _inputs(d, i)
    prepared = core.prepare(family, m.config, inputs)
    (grids,) = fam.visual_grids(m.config, inputs)
    slots = np.concatenate([g.reshape(-1) for g in grids])
    visual = np.flatnonzero(np.asarray(prepared.arrays["visual"][0] if family == "llava_next"
                                       else prepared.arrays["feature_index"][0] >= 0))
    assert len(set(slots.tolist())) == len(slots) and set(slots) <= set(visual)
    outside = sorted(set(visual) - set(slots))
    if family == "llava_next":
      index = np.asarray(prepared.arrays["feature_index"][0])
      assert outside == np.flatnonzero(index == llava_next.NEWLINE).tolist()
    else:
      assert outside == []


@pytest.mark.parametrize("setup", ["qwen2_vl"], indirect=True)   # a LLaVA-NeXT base grid
def test_horizon_says_why_a_question_without_windows_is_skipped(setup, tmp_path, capsys):
  _, d = setup                                                     # always holds windows
  Image.new("RGB", (64, 8), "white").save(tmp_path / "thin.png")   # merged grid 1 x 8
  (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": "t", "image": "thin.png",
                                                "text": "a"}) + "\n")
  (tmp_path / "key.jsonl").write_text(json.dumps({"question_id": "t", "answer": "a"}) + "\n")
  assert cli.main(["analyze", "horizon", "--model", str(d / "model"), "--questions",
                   str(tmp_path / "q.jsonl"), "--image-folder", str(tmp_path), "--answer-key",
                   str(tmp_path / "key.jsonl"), "--layers", "1", "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "question t: skipped, its visual grids [[1, 8]] have no 2x2 window" in err
  assert err.strip().splitlines()[-1].startswith("error: no readable question with a 2x2")
