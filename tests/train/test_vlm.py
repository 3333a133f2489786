"""`jaxmm train vlm`: inputs equal the saved processor's, answer-only targets, kill + resume."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jaxmm
from jaxmm import checkpoint
from jaxmm.data import digits_vqa
from jaxmm.errors import JaxmmError
from jaxmm.models import clip
from jaxmm.train import vlm, vlm_task

REPO = Path(__file__).resolve().parents[2]
TINY = vlm.tiny()


@pytest.fixture(scope="module")
def tiny_run():
  return vlm.Run(TINY)


def test_training_inputs_equal_what_the_saved_processor_gives(tiny_run, tmp_path):
  from transformers import AutoProcessor
  tiny_run.save_model(tmp_path / "m")
  proc = AutoProcessor.from_pretrained(tmp_path / "m")
  images, items = digits_vqa.make_split(TINY.data, "test", 2, seed=0)
  enc = vlm_task.Encoder(tiny_run.tok, tiny_run.cfg.num_image_tokens, tiny_run.cfg.image_token_id)
  for img, qa in zip(images, items):
    q = qa[0][1]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    got = proc(images=Image.fromarray(img).convert("RGB"), return_tensors="np",
               text=proc.apply_chat_template(msgs, add_generation_prompt=True))
    assert got["input_ids"][0].tolist() == enc.prompt(q)
    np.testing.assert_allclose(got["pixel_values"][0], vlm_task.pixel_values(img[None])[0], atol=1e-5)


def test_targets_are_exactly_the_answers_and_eos(tiny_run):
  _, items = digits_vqa.training_set(TINY.data, TINY.train_images, TINY.seed,
                                     TINY.turns_per_category)
  tok = tiny_run.tok
  for ids, target, qa in zip(tiny_run.ids[:8], tiny_run.target[:8], items[:8]):
    got = tok.convert_ids_to_tokens(ids[target].tolist())
    assert got[1::2] == ["</s>"] * len(qa)  # every answer is one word, then EOS
    assert sorted(got[0::2]) == sorted(a for _, _, a in qa)
    assert (ids == tiny_run.cfg.image_token_id).sum() == tiny_run.cfg.num_image_tokens


def test_default_preset_meets_the_issue_shape():
  tc = vlm.default()
  cfg = vlm.model_config(tc, vlm.word_tokenizer(digits_vqa.words(tc.data)))
  assert cfg.num_image_tokens >= 144 and cfg.text.num_layers >= 8


def test_aux_head_reads_each_cells_own_patch_block_through_the_lm_head():
  tc = vlm.TrainConfig(aux_pool="cell")   # 48 px cells filled by their scan, patch 4
  side, g = tc.data.image_size // tc.patch_size, tc.data.grid
  s = side // g
  r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  cell_of_patch = ((r // s) * g + c // s).reshape(-1)                 # row-major patches
  tok = vlm.word_tokenizer(digits_vqa.words(tc.data))
  cfg = vlm.model_config(tc, tok)
  digit_ids = tok.convert_tokens_to_ids([str(d) for d in range(10)])
  d = cfg.text.hidden_size
  kernel = np.zeros((d, cfg.text.vocab_size), np.float32)
  kernel[np.arange(10), digit_ids] = 1.0                              # channel k -> digit k
  llm = {"norm": {"scale": np.ones(d, np.float32)}, "lm_head": {"kernel": kernel}}
  feats = np.eye(d, dtype=np.float32)[cell_of_patch][None]            # one-hot of the cell
  logits = np.asarray(vlm_task.aux_logits(cfg, tc, llm, {"bias": np.zeros(10)}, digit_ids, feats))
  assert logits.shape == (1, g * g, 10)
  np.testing.assert_array_equal(logits[0].argmax(-1), np.arange(g * g))


def test_sincos_positions_are_distinct_unit_scale_codes():
  pe = clip.sincos_positions(12, 64)
  assert pe.shape == (145, 64) and not pe[0].any()
  d = np.linalg.norm(pe[1:, None] - pe[None, 1:], axis=-1)
  assert d[~np.eye(144, dtype=bool)].min() > 0.1
  np.testing.assert_allclose(np.linalg.norm(pe[1:], axis=-1), np.sqrt(32), rtol=1e-5)


@pytest.mark.parametrize("batch,cores,want", [(8, 2, 4), (4, 2, 4), (6, 2, 3), (7, 2, 1),
                                               (32, 8, 16), (1, 2, 1), (8, 1, 2)])
def test_a_cpu_host_is_split_into_two_devices_per_core_that_divide_the_batch(batch, cores, want):
  assert vlm.cpu_devices(batch, cores) == want


def test_a_run_with_another_config_is_refused(tmp_path):
  vlm._check_same_config(tmp_path, TINY, None)
  with pytest.raises(JaxmmError, match="another configuration"):
    vlm._check_same_config(tmp_path, dataclasses.replace(TINY, lr=1.0), None)


def _train_cli(out, *extra):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxmm.train.vlm", "--preset", "tiny", "--out", str(out),
                         *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
  out = tmp_path / "run"
  killed = _train_cli(out, "--kill-at-step", "3")
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert checkpoint.TrainCheckpointer(out / "ckpt").latest_step() == 2
  assert not (out / "model").exists()
  before = {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}
  assert sorted(before) == [1, 2, 3]
  resumed = _train_cli(out)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step 2" in resumed.stdout
  after = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in after] == list(range(1, TINY.steps + 1))
  # Step 3 ran twice: before the kill from live state, after it from the restored checkpoint.
  assert after[2]["loss"] == pytest.approx(before[3]["loss"], rel=1e-6, abs=1e-7)
  assert after[2]["loss"] != after[3]["loss"]
  m = jaxmm.load(out / "model")
  assert m.config.num_image_tokens == 16 and m.config.text.num_layers == TINY.text_layers
  # The CLI split the 2+ cores into devices and trained data parallel; its steps are the
  # single-device steps up to the order of the batch sums (f32 rounding, amplified by a few
  # Adam steps: about 1e-7 relative was measured).
  assert f"data parallel over {vlm.cpu_devices(TINY.batch_size)} cpu devices" in killed.stdout
  single = vlm.Run(TINY)
  losses = [single.step(s)["loss"] for s in range(1, TINY.steps + 1)]
  np.testing.assert_allclose([r["loss"] for r in after], losses, rtol=1e-5)
