"""Pruning on Qwen2.5-VL: picks equal references built from transformers' own tensors, per
example with different visual-token counts; keep-all is the identity; shapes of the full-size
configs; one-line errors for bad inputs."""
import json

import jax
import numpy as np
import pytest
import torch

from jaxmm import config as config_lib
from jaxmm import generation, registry
from jaxmm.converters.cli import convert_folder
from jaxmm.converters.common import flatten
from jaxmm.errors import ConfigError, InputError
from jaxmm.models import qwen2_vl
from jaxmm.pruning import schedule as schedule_lib
from qwen_tiny import IMAGE, batch, tiny_qwen, torch_inputs

# 6 and 15 visual tokens: a percentage keeps round-half-up of each example's own count.
MIXED = [[("image", (1, 4, 6))], [("image", (1, 10, 6))]]
# EntropyPrune's layer for Qwen2.5-VL-7B (pruning.md §3.2 / §10.3: ECL = 1, scored with the
# queries of layer 0).
ENTROPY_LAYER_QWEN25 = 1


@pytest.fixture(scope="module")
def tiny():
  model, cfg, params = tiny_qwen("qwen2_5_vl", seed=4)
  model.set_attn_implementation("eager")
  return model, cfg, params, batch(MIXED, seed=11)


def _sched(spec):
  return schedule_lib.parse(spec, positions="preserve")


def _kept(cfg, params, inputs, spec):
  out = qwen2_vl.forward(cfg, params, schedule=_sched(spec), **inputs)
  return [set(row[row >= 0].tolist()) for row in np.asarray(out.kept[0])]


def _top(scores_T, visual_T, k):
  """The k visual slots with the highest scores (ties: lower slot)."""
  idx = np.flatnonzero(visual_T)
  return set(idx[np.argsort(-scores_T[idx], kind="stable")[:k]].tolist())


def _own_keep(inputs, pct):
  counts = (inputs["input_ids"] == IMAGE).sum(axis=1)
  return [schedule_lib.keep_count(pct, int(n)) for n in counts]


def _matrix_entropy(q_HxK):
  """pruning.md §2.1 in float64: centre across heads, dual Gram / H, clamp, -Σλlnλ / ln H."""
  r = q_HxK - q_HxK.mean(axis=0, keepdims=True)
  lam = np.maximum(np.linalg.eigvalsh(r @ r.T / r.shape[0]), 1e-10)
  return -(lam * np.log(lam)).sum() / np.log(r.shape[0])


def test_entropy_picks_equal_reference_from_transformers_queries(tiny):
  model, cfg, params, inputs = tiny
  k = ENTROPY_LAYER_QWEN25
  grab = {}
  layer = model.model.language_model.layers[k - 1].self_attn.q_proj
  hook = layer.register_forward_hook(lambda m, i, o: grab.update(q=o.double().numpy()))
  with torch.no_grad():
    model(**torch_inputs(inputs))
  hook.remove()
  b, t = inputs["input_ids"].shape
  q = grab["q"].reshape(b, t, cfg.text.num_heads, cfg.text.head_dim)
  ours = _kept(cfg, params, inputs, f"entropy@{k}:50%")
  for i, keep in enumerate(_own_keep(inputs, "50%")):
    s = np.asarray([_matrix_entropy(q[i, j]) for j in range(t)])
    assert ours[i] == _top(s, inputs["input_ids"][i] == IMAGE, keep)


def test_fastv_picks_equal_reference_from_transformers_attentions(tiny):
  model, cfg, params, inputs = tiny
  with torch.no_grad():
    att = model(**torch_inputs(inputs), output_attentions=True).attentions
  row = att[1][:, :, -1, :].mean(1).numpy()   # layer K-1 = 1, last prompt token, head mean
  ours = _kept(cfg, params, inputs, "fastv@2:40%")
  for i, keep in enumerate(_own_keep(inputs, "40%")):
    assert ours[i] == _top(row[i], inputs["input_ids"][i] == IMAGE, keep)


def _divprune_reference(x_NxD, k):
  """Greedy max-min cosine diversity (pruning.md §5) in float64, brute force."""
  xn = x_NxD / np.linalg.norm(x_NxD, axis=1, keepdims=True)
  d = 1.0 - xn @ xn.T
  np.fill_diagonal(d, np.inf)
  picks = [int(np.argmax(d.min(axis=1)))]
  np.fill_diagonal(d, 0.0)
  while len(picks) < k:
    to_set = d[:, picks].min(axis=1)
    to_set[picks] = -np.inf
    picks.append(int(np.argmax(to_set)))
  return picks


def test_divprune_picks_equal_reference_from_transformers_merger(tiny):
  model, cfg, params, inputs = tiny
  with torch.no_grad():
    feats = model.model.visual(torch.tensor(inputs["pixel_values"]),
                               grid_thw=torch.tensor(inputs["image_grid_thw"]))
  merged = feats.pooler_output.double().numpy()
  ours = _kept(cfg, params, inputs, "divprune@0:50%")
  start = 0
  for i, keep in enumerate(_own_keep(inputs, "50%")):
    slots = np.flatnonzero(inputs["input_ids"][i] == IMAGE)
    own = merged[start:start + len(slots)]
    start += len(slots)
    assert ours[i] == set(slots[_divprune_reference(own, keep)].tolist())


@pytest.mark.parametrize("spec", ["entropy@1:100%", "fastv@2:100%", "divprune@0:100%",
                                  "random@1:100%", "divprune@0:100%,random@2:100%"])
def test_keep_all_changes_no_logit(tiny, spec):
  _, cfg, params, inputs = tiny
  base = np.asarray(qwen2_vl.forward(cfg, params, **inputs).logits)
  out = qwen2_vl.forward(cfg, params, schedule=_sched(spec), **inputs)
  valid = inputs["attention_mask"].astype(bool)
  assert out.logits.shape == base.shape
  assert np.abs(np.asarray(out.logits) - base)[valid].max() <= 1e-5


def test_multi_stage_keeps_each_examples_own_share_and_generates(tiny):
  _, cfg, params, inputs = tiny
  spec = "divprune@0:50%,random@2:50%"
  out = qwen2_vl.forward(cfg, params, schedule=_sched(spec), **inputs)
  first = [schedule_lib.keep_count("50%", n) for n in (6, 15)]
  assert [int((r >= 0).sum()) for r in np.asarray(out.kept[0])] == first
  assert [int((r >= 0).sum()) for r in np.asarray(out.kept[1])] == [
      schedule_lib.keep_count("50%", n) for n in first]
  tokens = generation.generate(cfg, params, schedule=_sched(spec), max_new_tokens=3, **inputs)
  np.testing.assert_array_equal(tokens[:, 0], np.asarray(out.logits)[:, -1].argmax(-1))


def test_compact_positions_are_rejected_for_mrope(tiny):
  _, cfg, params, inputs = tiny
  with pytest.raises(InputError, match="compact.*M-RoPE"):
    qwen2_vl.forward(cfg, params, schedule="divprune@0:50%", **inputs)


# ---- shapes of the full-size configs --------------------------------------------------------

def _count(cfg) -> int:
  tree = jax.eval_shape(lambda k: qwen2_vl.init_params(cfg, k), jax.random.key(0))
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def _decoder_count(d, f, layers, kv_dim, vocab) -> int:
  layer = 2 * d + (d * d + d) + 2 * (d * kv_dim + kv_dim) + d * d + 3 * d * f
  return 2 * vocab * d + layers * layer + d      # embed, lm_head (untied), layers, final norm


def test_qwen25_vl_7b_parameter_count_by_shape():
  e, f, patch = 1280, 3420, 3 * 2 * 14 * 14
  block = 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + 3 * e * f + 2 * f + e   # RMSNorm, SwiGLU
  merger = e + (4 * e * 4 * e + 4 * e) + (4 * e * 3584 + 3584)
  vision = patch * e + 32 * block + merger
  text = _decoder_count(3584, 18944, 28, 512, 152064)
  assert (vision, text) == (676_550_144, 7_615_616_512)
  assert _count(config_lib.qwen25_vl_7b()) == vision + text == 8_292_166_656


def test_qwen2_vl_7b_parameter_count_by_shape():
  e, f, patch = 1280, 5120, 3 * 2 * 14 * 14
  block = 4 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * f + f) + (f * e + e)  # LayerNorm
  merger = 2 * e + (4 * e * 4 * e + 4 * e) + (4 * e * 3584 + 3584)
  vision = patch * e + 32 * block + merger
  assert vision == 675_759_104
  assert _count(config_lib.qwen2_vl_7b()) == vision + 7_615_616_512 == 8_291_375_616


@pytest.mark.parametrize("preset", ["qwen2_vl_7b", "qwen25_vl_7b", "qwen25_vl_72b"])
def test_init_params_equal_the_rule_table(preset):
  cfg = getattr(config_lib, preset)()
  fam = registry.family_module("qwen2_vl")
  got = {k: tuple(v.shape) for k, v in flatten(
      jax.eval_shape(lambda k: fam.init_params(cfg, k), jax.random.key(0))).items()}
  assert got == {r.dst: r.out_shape() for r in fam.rules(cfg)}


# ---- one-line errors -----------------------------------------------------------------------

def _one_line(excinfo):
  assert "\n" not in str(excinfo.value)


def test_bad_inputs_get_one_line_errors(tiny):
  _, cfg, params, inputs = tiny
  run = lambda **kw: qwen2_vl.forward(cfg, params, **{**inputs, **kw})
  with pytest.raises(InputError, match="describes 84 patches, but the pixels hold 80") as e:
    run(pixel_values=inputs["pixel_values"][:80])
  _one_line(e)
  ids = inputs["input_ids"].copy()
  ids[1, np.flatnonzero(ids[1] == IMAGE)[0]] = 5
  with pytest.raises(InputError, match="hold 20 image tokens, but image_grid_thw gives 21") as e:
    run(input_ids=ids, mm_token_type_ids=None)
  _one_line(e)
  with pytest.raises(InputError, match="pixel_values_videos was given without video_grid_thw") as e:
    run(pixel_values_videos=inputs["pixel_values"])
  _one_line(e)
  with pytest.raises(InputError, match="second_per_grid_ts"):
    _, cfg2, params2 = tiny_qwen("qwen2_vl")
    qwen2_vl.forward(cfg2, params2, second_per_grid_ts=np.ones(1, np.float32), **inputs)


def test_unknown_rope_type_is_a_one_line_error_and_writes_nothing(tiny, tmp_path):
  model = tiny[0]
  model.save_pretrained(tmp_path / "hf")
  path = tmp_path / "hf" / "config.json"
  d = json.loads(path.read_text())
  d["text_config"]["rope_parameters"]["rope_type"] = "yarn"
  path.write_text(json.dumps(d))
  with pytest.raises(ConfigError, match="unknown rope type 'yarn'") as e:
    convert_folder(tmp_path / "hf", tmp_path / "out")
  _one_line(e)
  assert not (tmp_path / "out").exists()


def test_gqa_flops_read_the_qwen_decoder():
  """The exact GQA FLOPs convention takes Qwen2.5-VL-7B's 28 query / 4 KV heads of 128."""
  from jaxmm import flops
  dims = flops.Dims.from_config(config_lib.qwen25_vl_7b())
  n, d, m = 1000, 3584, 18944
  want = 2 * n * (d * 3584 + 2 * d * 512 + 3584 * d) + 4 * n * n * 3584 + 6 * n * d * m
  assert flops.layer_flops(n, dims, "gqa") == want < flops.layer_flops(n, dims, "B")
