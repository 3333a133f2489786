"""LLaVA-NeXT (anyres) vs transformers' LlavaNextForConditionalGeneration (the oracle), fp32.

Tiny random models built from a config (CLIP 16 px / patch 4: 4 x 4 features per tile; a
4-layer LLaMA), fed by transformers' own LlavaNextProcessor (PIL backend), so the placeholder
counts, tiles and image sizes are the processor's. Images of different sizes in one batch pick
different pinpoints and give different visual counts.
"""
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                          LlavaNextProcessor)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import jaxmm
from jaxmm import config as config_lib
from jaxmm import registry
from jaxmm.converters.cli import convert_folder, convert_model
from jaxmm.converters.common import flatten
from jaxmm.converters.export import export_folder
from jaxmm.data.tokenizer import word_tokenizer
from jaxmm.errors import ConfigError, InputError
from jaxmm.models import core, llava_next

S, PATCH = 16, 4                          # tile side and ViT patch: 4 x 4 features per tile
GRID_A = ((16, 32), (32, 16), (32, 32), (48, 16), (16, 48))   # LLaVA-1.6's, 336 px -> 16 px
GRID_B = ((16, 16), (16, 32), (32, 48), (48, 32))
SIZES = ((20, 30), (40, 12))              # (height, width) of the batch's two images
PROMPTS = ("a <image> b c", "USER: <image> d a b ASSISTANT:")
TOK = word_tokenizer(["a", "b", "c", "d"])


def hf_config(grid=GRID_A, feature_layer=-2, gqa=True, strategy="default") -> LlavaNextConfig:
  vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, image_size=S, patch_size=PATCH)
  tc = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2 if gqa else 4, head_dim=12, vocab_size=len(TOK),
                   bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
                   pad_token_id=TOK.pad_token_id)
  return LlavaNextConfig(vision_config=vc, text_config=tc,
                         image_grid_pinpoints=[list(p) for p in grid],
                         image_token_index=TOK.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=feature_layer,
                         vision_feature_select_strategy=strategy)


def tiny(seed=0, **kw):
  """(torch model, jaxmm config, params): every weight random at a scale that keeps the logits
  O(1) (norm scales and biases included, so a mix-up cannot hide)."""
  torch.manual_seed(seed)
  model = LlavaNextForConditionalGeneration(hf_config(**kw)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:      # matrices: unit-variance outputs
        p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
      elif name.endswith("weight"):   # norm scales around 1
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:               # biases; the newline embedding at the features' scale
        p.copy_(torch.randn_like(p) * (1.0 if "newline" in name else 0.3))
  return (model, *convert_model(model))


def processor(grid=GRID_A) -> LlavaNextProcessor:
  images = LlavaNextImageProcessorPil(image_grid_pinpoints=[list(p) for p in grid],
                                      size={"shortest_edge": S},
                                      crop_size={"height": S, "width": S})
  return LlavaNextProcessor(image_processor=images, tokenizer=TOK, patch_size=PATCH,
                            vision_feature_select_strategy="default", num_additional_image_tokens=1)


def images(sizes=SIZES, seed=0):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def batch(grid=GRID_A, sizes=SIZES, prompts=PROMPTS, seed=0) -> dict:
  """The processor's outputs (NumPy, left padded) for one image per prompt."""
  return dict(processor(grid)(images=images(sizes, seed), text=list(prompts), return_tensors="np",
                              padding=True))


def torch_inputs(inputs: dict) -> dict:
  mask = inputs["attention_mask"]
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)   # what transformers' generate uses
  return {**{k: torch.tensor(v) for k, v in inputs.items()}, "position_ids": torch.tensor(pos)}


def hf_forward(model, inputs, **kw):
  with torch.no_grad():
    return model(**torch_inputs(inputs), **kw)


def max_err(ours, ref, mask) -> float:
  return float(np.abs(np.asarray(ours) - np.asarray(ref))[mask.astype(bool)].max())


@pytest.fixture(scope="module")
def tiny_a():
  model, cfg, params = tiny(seed=4)   # a seed whose greedy answers vary by step and example
  return model, cfg, params, batch()


# ---- the anyres geometry, against transformers' own functions --------------------------------

@pytest.mark.parametrize("grid", [GRID_A, GRID_B, config_lib.llava16_7b().image_grid_pinpoints])
def test_host_geometry_equals_the_processor_and_the_model(grid):
  side = 336 if grid[0][0] % 336 == 0 else S
  cfg = config_lib.LlavaNextConfig(
      vision=config_lib.ClipVisionConfig(image_size=side, patch_size=14 if side == 336 else PATCH),
      image_grid_pinpoints=grid)
  proc = processor(grid)
  proc.patch_size = cfg.vision.patch_size
  rng = np.random.default_rng(0)
  for h, w in rng.integers(1, 4 * side, (60, 2)).tolist() + [[side, side], [1, 3 * side]]:
    assert llava_next.best_resolution((h, w), grid) == select_best_resolution((h, w), list(grid))
    assert llava_next.num_tiles(cfg, (h, w)) == image_size_to_num_patches((h, w), list(grid), side)
    n = proc._get_number_of_features(h, w, side, side) - 1   # less the CLS ("default")
    assert llava_next.num_features(cfg, (h, w)) == n == len(llava_next.feature_sources(cfg, (h, w)))


# ---- parity with transformers ----------------------------------------------------------------

TWO_AND_NONE = ("USER: <image> a <image> b ASSISTANT:", "c d a b")   # two images, then none


@pytest.mark.parametrize("grid,layer,gqa,prompts", [
    (GRID_A, -2, True, PROMPTS), (GRID_B, -2, False, PROMPTS), (GRID_A, [-2, -1], True, PROMPTS),
    (GRID_B, -1, True, TWO_AND_NONE)])
def test_logits_match_transformers(grid, layer, gqa, prompts):
  model, cfg, params = tiny(grid=grid, feature_layer=layer, gqa=gqa)
  inputs = batch(grid, prompts=prompts)
  picks = [llava_next.best_resolution(s, grid) for s in SIZES]
  counts = [llava_next.num_features(cfg, s) for s in SIZES]
  assert picks[0] != picks[1] and counts[0] != counts[1]   # different grids, different counts
  per_image = iter(counts)
  want = [sum(next(per_image) for _ in range(p.count("<image>"))) for p in prompts]
  assert llava_next.prepare(cfg, inputs).visual_B.tolist() == want
  assert sorted(inputs["attention_mask"][:, 0].tolist()) == [0, 1]   # one is left padded
  ref = hf_forward(model, inputs).logits.numpy()
  out = jaxmm.forward(jaxmm.Model("llava_next", cfg, params), **inputs)
  assert out.logits.shape == ref.shape
  assert max_err(out.logits, ref, inputs["attention_mask"]) <= 1e-4


def test_logits_match_without_jit(tiny_a):
  model, cfg, params, inputs = tiny_a
  with jax.disable_jit():
    out = llava_next.forward(cfg, params, **inputs)
  assert max_err(out.logits, hf_forward(model, inputs).logits, inputs["attention_mask"]) <= 1e-4


def test_full_feature_selection_is_refused_as_transformers_cannot_run_it():
  """With CLIP's CLS token the tiles' h*w+1 features do not fold into a grid: transformers'
  LlavaNextModel fails on any anyres image, and jaxmm refuses the config."""
  model = LlavaNextForConditionalGeneration(hf_config(strategy="full")).eval()
  inputs = batch()
  with pytest.raises(RuntimeError):
    hf_forward(model, {**inputs, "input_ids": inputs["input_ids"][:, :3],
                       "attention_mask": inputs["attention_mask"][:, :3]})
  with pytest.raises(ConfigError, match="vision_feature_select_strategy='full'"):
    config_lib.LlavaNextConfig.from_hf(hf_config(strategy="full").to_dict())


def test_compiles_depend_only_on_padded_shapes(tiny_a):
  """Two batches of other image sizes, padded to the same (B, T, tiles): one compile."""
  _, cfg, params, _ = tiny_a
  runs = [batch(sizes=s) for s in [((20, 30), (40, 12)), ((33, 17), (9, 41)), ((16, 16), (30, 29))]]
  t = max(r["input_ids"].shape[1] for r in runs)
  sizes = []
  for r in runs:
    assert r["pixel_values"].shape[1] == 5
    pad = t - r["input_ids"].shape[1]
    r["input_ids"] = np.pad(r["input_ids"], ((0, 0), (pad, 0)))
    r["attention_mask"] = np.pad(r["attention_mask"], ((0, 0), (pad, 0)))
    llava_next.forward(cfg, params, **r)
    sizes.append(core._forward._cache_size())
  assert len({tuple(llava_next.prepare(cfg, r).visual_B) for r in runs}) == 3
  assert sizes[1] == sizes[2] == sizes[0]


def test_greedy_generation_matches_transformers(tiny_a):
  model, cfg, params, inputs = tiny_a
  with torch.no_grad():
    ref = model.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, max_new_tokens=8,
                         do_sample=False)
  ref = ref[:, inputs["input_ids"].shape[1]:].numpy()
  ours = jaxmm.generate(jaxmm.Model("llava_next", cfg, params), **inputs, max_new_tokens=8)
  n = ours.shape[1]
  np.testing.assert_array_equal(ours, ref[:, :n])
  assert n == ref.shape[1] or (ref[:, n:] == TOK.pad_token_id).all()


# ---- pruning: picks against references from transformers' tensors -----------------------------

def entropy_ref(q_NxHxK) -> np.ndarray:
  """pruning.md §2.1 in float64: centre over heads, dual Gram / H, eigvalsh, -Σλlnλ / lnH."""
  r = q_NxHxK - q_NxHxK.mean(axis=1, keepdims=True)
  lam = np.maximum(np.linalg.eigvalsh(np.einsum("nhk,ngk->nhg", r, r) / r.shape[1]), 1e-10)
  return -(lam * np.log(lam)).sum(-1) / np.log(r.shape[1])


def divprune_ref(x_NxD, k: int) -> list:
  """Greedy max-min cosine diversity (pruning.md §5), brute force in float64."""
  xn = x_NxD / np.linalg.norm(x_NxD, axis=1, keepdims=True)
  dist = 1.0 - xn @ xn.T
  picks = [int(np.argmax(np.where(np.eye(len(xn), dtype=bool), np.inf, dist).min(axis=1)))]
  while len(picks) < k:
    to_picks = dist[:, picks].min(axis=1)
    to_picks[picks] = -np.inf
    picks.append(int(np.argmax(to_picks)))
  return picks


def top_k(scores_N, k: int) -> list:
  return list(np.argsort(-scores_N, kind="stable")[:k])


def reference_kept(model, cfg, inputs, method, layer, k, prune_newlines=True) -> list:
  """Per example, the sorted slots of the k visual tokens the method keeps, from transformers'
  own tensors: its layer-(K-1) q_proj on its hidden states (entropy), its eager attention of
  the last prompt token (fastv), its merged image features (divprune)."""
  ids = inputs["input_ids"]
  slots = [np.flatnonzero(row == cfg.image_token_id) for row in ids]
  with torch.no_grad():
    feats = [f.numpy().astype(np.float64) for f in model.model.get_image_features(
        torch.tensor(inputs["pixel_values"]), torch.tensor(inputs["image_sizes"])).pooler_output]
  newline = model.model.image_newline.detach().numpy()
  if method == "fastv":
    model.set_attn_implementation("eager")
    att = hf_forward(model, inputs, output_attentions=True).attentions[layer - 1]
    model.set_attn_implementation("sdpa")
    scores = att[:, :, -1, :].mean(1).numpy().astype(np.float64)
  elif method == "entropy":
    hs = hf_forward(model, inputs, output_hidden_states=True).hidden_states[layer - 1]
    block = model.model.language_model.layers[layer - 1]
    with torch.no_grad():
      q = block.self_attn.q_proj(block.input_layernorm(hs)).numpy().astype(np.float64)
    scores = np.stack([entropy_ref(row.reshape(row.shape[0], cfg.text.num_heads, -1)) for row in q])
  kept = []
  for b, pos in enumerate(slots):
    cand = np.ones(len(pos), bool) if prune_newlines else ~np.all(feats[b] == newline, axis=1)
    pos = pos[cand]
    k_b = min(k, len(pos))
    pick = divprune_ref(feats[b][cand], k_b) if method == "divprune" else top_k(scores[b][pos], k_b)
    kept.append(sorted(pos[pick].tolist()))
  return kept


@pytest.mark.parametrize("spec,prune_newlines", [("entropy@2:40", True), ("fastv@2:40", True),
                                                 ("divprune@0:40", True),
                                                 ("entropy@2:40", False)])
def test_picks_equal_references_from_transformers(tiny_a, spec, prune_newlines):
  model, cfg, params, inputs = tiny_a
  method, layer, k = spec.replace("@", ":").split(":")
  out = llava_next.forward(cfg, params, **inputs, schedule=spec, prune_newlines=prune_newlines)
  want = reference_kept(model, cfg, inputs, method, int(layer), int(k), prune_newlines)
  kept = np.asarray(out.kept[0])
  for b, w in enumerate(want):
    assert kept[b][kept[b] >= 0].tolist() == w
  if not prune_newlines:   # every newline slot is still there
    index = llava_next.prepare(cfg, inputs).arrays["feature_index"]
    origin = np.asarray(out.origin)
    for b in range(2):
      assert set(np.flatnonzero(index[b] == llava_next.NEWLINE)) <= set(origin[b].tolist())


def test_visual_counts_follow_prune_newlines(tiny_a):
  _, cfg, _, inputs = tiny_a
  rows = [llava_next.unpadded_grid(cfg, s)[1] for s in SIZES]
  counts = np.asarray([llava_next.num_features(cfg, s) for s in SIZES])
  assert llava_next.prepare(cfg, inputs).visual_B.tolist() == counts.tolist()
  off = llava_next.prepare(cfg, {**inputs, "prune_newlines": False})
  assert off.visual_B.tolist() == (counts - rows).tolist()
  assert (off.text_B - llava_next.prepare(cfg, inputs).text_B).tolist() == rows


def test_keep_all_schedule_changes_no_logit(tiny_a):
  _, cfg, params, inputs = tiny_a
  n = max(llava_next.num_features(cfg, s) for s in SIZES)
  base = llava_next.forward(cfg, params, **inputs).logits
  spec = f"divprune@0:{n},random@1:{n},fastv@2:{n},entropy@3:{n}"
  out = llava_next.forward(cfg, params, **inputs, schedule=spec)
  assert out.logits.shape == base.shape
  assert max_err(out.logits, base, inputs["attention_mask"]) <= 1e-5


# ---- errors -----------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_errors(tiny_a):
  _, cfg, params, inputs = tiny_a
  fwd = lambda **kw: llava_next.forward(cfg, params, **{**inputs, **kw})
  one_less = inputs["input_ids"].copy()
  last = np.flatnonzero(one_less[1] == cfg.image_token_id)[-1]
  one_less[1, last] = TOK.convert_tokens_to_ids("a")
  cases = [
      (dict(image_sizes=inputs["image_sizes"][:1]), r"image_sizes must be integers \[images, 2\]"),
      (dict(pixel_values=inputs["pixel_values"][:, :3]), "takes 5 tiles"),
      (dict(image_sizes=None), "needs image_sizes"),
      (dict(input_ids=one_less), r"input_ids hold 145 image tokens, but the anyres features of 2 "
                                 r"image\(s\) of sizes \[\[20, 30\], \[40, 12\]\] number 146 "),
      (dict(image_sizes=inputs["image_sizes"][:, ::-1].copy()), r"number 140 \(\[72, 68\] each"),
      (dict(pixel_values=inputs["pixel_values"][:, 0]), "must be 5-D"),
      (dict(prune_newlines="no"), "prune_newlines"),
  ]
  for kw, match in cases:
    with pytest.raises(InputError, match=match) as e:
      fwd(**kw)
    assert "\n" not in str(e.value)


# ---- configs, params and conversion --------------------------------------------------------------

HUB_CONFIG = {   # llava-hf/llava-v1.6-vicuna-7b-hf's config.json (a sparse text_config)
    "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0,
                    "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
    "torch_dtype": "float16", "transformers_version": "4.39.0.dev0",
    "use_image_newline_parameter": True,
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                      "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}


def test_llava16_7b_preset_is_the_hub_config_and_its_parameter_count_by_shape():
  cfg = config_lib.llava16_7b()
  assert config_lib.LlavaNextConfig.from_hf(HUB_CONFIG) == cfg
  assert config_lib.LlavaNextConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  fam = registry.family_module("llava_next")
  tree = jax.eval_shape(lambda k: fam.init_params(cfg, k), jax.random.key(0))
  n = sum(int(x.size) for x in jax.tree.leaves(tree))
  d, f, v = 1024, 4096, 32064   # by hand: CLIP ViT-L/14-336 without the unused post-LN
  clip_layer = 2 * 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
  clip = 14 * 14 * 3 * d + d + 577 * d + 2 * d + 24 * clip_layer                  # 303,505,408
  projector = (d * 4096 + 4096) + (4096 * 4096 + 4096)                             # 20,979,712
  llm_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
  llm = 2 * v * 4096 + 32 * llm_layer + 4096                                      # 6,738,939,904
  newline = 4096
  assert n == clip + projector + llm + newline == 7_063_429_120
  # A 1008 x 336 image gives 576 + 72 x 25 = 2376 visual tokens, 4 tiles.
  assert llava_next.num_features(cfg, (1000, 330)) == 2376
  assert llava_next.num_tiles(cfg, (1000, 330)) == 4


def test_init_params_tree_equals_the_rule_table():
  fam = registry.family_module("llava_next")
  cfgs = [config_lib.LlavaNextConfig.from_hf(hf_config(**kw).to_dict())
          for kw in [{}, dict(feature_layer=[-2, -1], gqa=False)]]
  for cfg in cfgs + [config_lib.llava16_7b()]:
    got = {k: tuple(x.shape) for k, x in flatten(jax.eval_shape(
        lambda key: fam.init_params(cfg, key), jax.random.key(0))).items()}
    assert got == {r.dst: r.out_shape() for r in fam.rules(cfg)}


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_convert_both_layouts_and_export_round_trip(tiny_a, tmp_path):
  model, cfg, params, inputs = tiny_a
  model.save_pretrained(tmp_path / "hf")
  processor().save_pretrained(tmp_path / "hf")
  m = jaxmm.load(convert_folder(tmp_path / "hf", tmp_path / "out"))
  assert m.family == "llava_next" and m.config == cfg
  _assert_same_tree(m.params, params)
  hub = tmp_path / "hub"    # the older hub layout: CLIPVisionModel keeps its `vision_model`
  hub.mkdir()
  (hub / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  sd = {k.replace("model.vision_tower.", "vision_tower.vision_model.")
        .replace("model.multi_modal_projector.", "multi_modal_projector.")
        .replace("model.language_model.", "language_model.model.")
        .replace("model.image_newline", "image_newline")
        .replace("lm_head.", "language_model.lm_head."): v.contiguous()
        for k, v in model.state_dict().items()}
  assert "vision_tower.vision_model.embeddings.class_embedding" in sd and "image_newline" in sd
  save_file(sd, hub / "model.safetensors")
  _assert_same_tree(jaxmm.load(convert_folder(hub, tmp_path / "out_hub")).params, params)
  export_folder(m, tmp_path / "back")
  again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
  ref = hf_forward(model, inputs).logits
  assert max_err(hf_forward(again, inputs).logits, ref, inputs["attention_mask"]) == 0
  back = jaxmm.load(convert_folder(tmp_path / "back", tmp_path / "again"))
  assert back.config == cfg
  _assert_same_tree(back.params, params)


@pytest.mark.parametrize("text_change,match", [
    ({"model_type": "mistral"}, "text_config.model_type='mistral'"),
    ({"sliding_window": 4096}, "sliding_window"),
])
def test_an_unimplemented_decoder_is_a_one_line_config_error(tmp_path, text_change, match):
  LlavaNextForConditionalGeneration(hf_config()).save_pretrained(tmp_path / "src")
  d = json.loads((tmp_path / "src" / "config.json").read_text())
  d["text_config"].update(text_change)
  (tmp_path / "src" / "config.json").write_text(json.dumps(d))
  with pytest.raises(ConfigError, match=match) as e:
    convert_folder(tmp_path / "src", tmp_path / "out")
  assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
