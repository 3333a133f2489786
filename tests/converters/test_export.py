"""`jaxmm export`: a jaxmm LLaVA -> transformers LlavaForConditionalGeneration, and back."""
import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import jaxmm
from jaxmm.converters.cli import convert_folder
from jaxmm.converters.export import export_folder
from jaxmm.eval.export_parity import hf_inputs
from jaxmm.cli import module_main
from jaxmm.data import digits_vqa
from jaxmm.errors import JaxmmError
from jaxmm.train import vlm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(jaxmm model, HF folder): a tiny digits LLaVA with random weights, exported by the CLI."""
  d = tmp_path_factory.mktemp("export")
  run = vlm.Run(vlm.tiny())
  m = jaxmm.load(run.save_model(d / "jaxmm"))
  assert module_main("jaxmm.converters.export", [str(m.path), str(d / "hf")]) == 0
  return m, d / "hf"


def _inputs(hf_dir, n=6):
  """Left-padded processor inputs for digits-VQA test questions of every category."""
  from PIL import Image
  images, items = digits_vqa.make_split(vlm.tiny().data, "test", n, seed=5)
  return hf_inputs(AutoProcessor.from_pretrained(hf_dir),
                   [Image.fromarray(x).convert("RGB") for x in images],
                   [qa[i % 3][1] for i, qa in enumerate(items)])


def test_transformers_logits_and_greedy_answers_match(exported):
  m, hf_dir = exported
  hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
  ids, mask, px = _inputs(hf_dir)
  t = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
       "pixel_values": torch.tensor(px)}
  pos = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
  with torch.no_grad():
    ref = hf(**t, position_ids=pos).logits.numpy()
    ref_gen = hf.generate(**t, max_new_tokens=6, do_sample=False)[:, ids.shape[1]:].numpy()
  ours = np.asarray(jaxmm.forward(m, input_ids=ids, attention_mask=mask, pixel_values=px).logits)
  assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
  gen = jaxmm.generate(m, input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=6)
  pad = m.config.text.pad_token_id
  margins = _greedy_margins(m, ids, mask, px, ref_gen)
  for row, (a, b) in enumerate(zip(gen, ref_gen)):  # transformers pads finished rows to its length
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    # Random weights can produce exact near-ties; a divergence is only allowed at one of them.
    if diff.size:
      assert margins[row, diff[0]] < 1e-4, (row, diff[0], margins[row, diff[0]])
      continue
    assert set(a[n:].tolist()) <= {pad} and set(b[n:].tolist()) <= {pad}


def _greedy_margins(m, ids, mask, px, ref_gen):
  """f32[B, steps]: top-1 minus top-2 of jaxmm's logits along transformers' greedy sequence."""
  full = np.concatenate([ids, ref_gen], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(ref_gen)], axis=1)
  logits = np.asarray(jaxmm.forward(m, input_ids=full, attention_mask=full_mask,
                                    pixel_values=px).logits)
  steps = logits[:, ids.shape[1] - 1:-1]
  top2 = np.sort(steps, axis=-1)[..., -2:]
  return top2[..., 1] - top2[..., 0]


def test_converting_back_gives_the_same_params_and_config(exported, tmp_path):
  m, hf_dir = exported
  back = jaxmm.load(convert_folder(hf_dir, tmp_path / "back"))
  assert back.config == m.config
  assert jax.tree.structure(back.params) == jax.tree.structure(m.params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               back.params, m.params)
  cfg = json.loads((hf_dir / "config.json").read_text())
  assert cfg["model_type"] == "llava" and cfg["vision_feature_layer"] == -1


def test_export_refuses_an_existing_folder_and_a_non_llava_model(exported, tmp_path):
  m, hf_dir = exported
  with pytest.raises(JaxmmError, match="already exists"):
    export_folder(m, hf_dir)
  llama = jaxmm.Model("llama", m.config.text, m.params["llm"], m.path)
  with pytest.raises(JaxmmError, match="writes LLaVA models"):
    export_folder(llama, tmp_path / "x")
  assert not (tmp_path / "x").exists()


def test_export_parity_script_on_a_question_file(exported, tmp_path):
  """`jaxmm.eval.export_parity` compares a model with its export on a LLaVA-format question file."""
  from PIL import Image
  m, _ = exported
  images, items = digits_vqa.make_split(vlm.tiny().data, "test", 2, seed=3)
  rows = []
  for i, (img, qa) in enumerate(zip(images, items)):
    Image.fromarray(img).convert("RGB").save(tmp_path / f"{i}.png")
    rows += [{"question_id": f"{i}-{c}", "image": f"{i}.png", "text": q} for c, q, _ in qa]
  (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = ["--model", str(m.path), "--questions", str(tmp_path / "q.jsonl"), "--image-folder",
          str(tmp_path), "--n", "5", "--batch-size", "3", "--out", str(tmp_path / "p.json")]
  assert module_main("jaxmm.eval.export_parity", args) == 0
  res = json.loads((tmp_path / "p.json").read_text())
  assert res["questions"] == 5 and len(res["answers"]) == 5
  assert res["max_abs_logit_diff"] <= 1e-4
  assert [a["question_id"] for a in res["answers"]] == [r["question_id"] for r in rows[:5]]
