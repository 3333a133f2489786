"""Pruning integrated in the LLaVA forward and in generation, against simple references."""
import jax
import numpy as np
import pytest
import torch

from jaxmm import generation
from jaxmm.errors import InputError
from jaxmm.models import llava, segments
from jaxmm.pruning import schedule as schedule_lib
from masked_reference import greedy_reference, masked_logits
from tiny_hf import hf_positions, llava_batch, tiny_llava

DEFAULT_LAYER = {"entropy": 2, "random": 2, "divprune": 0, "fastv": 1}
SPECS = ["entropy@2:5", "fastv@1:8", "divprune@0:6", "random@1:4", "divprune@0:10,random@2:3",
         "fastv@1:50%,entropy@2:3"]


@pytest.fixture(scope="module")
def tiny():
  model, cfg, params = tiny_llava(seed=2)
  ids, mask, px = llava_batch(cfg, seed=5, pad=(0, 3))
  return model, cfg, params, ids, mask, px


def _resolved(cfg, spec, positions=None):
  sched = schedule_lib.parse(spec, positions=positions)
  return schedule_lib.resolve(sched, cfg.num_image_tokens, cfg.text.num_layers)


@pytest.mark.parametrize("method", sorted(DEFAULT_LAYER))
def test_keep_all_equals_no_schedule(tiny, method):
  _, cfg, params, ids, mask, px = tiny
  base = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask).logits
  spec = f"{method}@{DEFAULT_LAYER[method]}:{cfg.num_image_tokens}"
  out = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask, schedule=spec)
  assert out.logits.shape == base.shape
  valid = mask.astype(bool)
  assert np.abs(np.asarray(out.logits) - np.asarray(base))[valid].max() <= 1e-5


@pytest.mark.parametrize("positions", ["preserve", "compact"])
@pytest.mark.parametrize("spec", SPECS)
def test_gather_matches_masked_reference(tiny, spec, positions):
  _, cfg, params, ids, mask, px = tiny
  sched = _resolved(cfg, spec, positions)
  out = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                      schedule=sched)
  assert [k.shape[1] for k in out.kept] == [s.keep for s in sched]
  ref, alive = masked_logits(cfg, params, ids, px, mask, sched, out.kept)
  origin = np.asarray(out.origin)
  rows = np.take_along_axis(ref, origin[..., None], axis=1)
  live = np.take_along_axis(alive, origin, axis=1)
  assert live.sum() == alive.sum()  # every live token survived the gather, nothing else did
  assert np.abs(np.asarray(out.logits) - rows)[live].max() <= 1e-4


def test_fastv_row_matches_transformers_attentions(tiny):
  model, cfg, params, ids, mask, px = tiny
  k_layer = 2
  model.set_attn_implementation("eager")
  with torch.no_grad():
    hf = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
               attention_mask=torch.tensor(mask), position_ids=torch.tensor(hf_positions(mask)),
               output_attentions=True)
  ref = hf.attentions[k_layer - 1][:, :, -1, :].mean(1).numpy()
  arrays = {"input_ids": ids, "pixel_values": px, "attention_mask": mask.astype(bool),
            "position_ids": hf_positions(mask)}
  state = llava.token_state(cfg, params, arrays)
  _, out = segments.run_range(llava.decoder(cfg), llava.decoder_params(params), state, 0, k_layer,
                              frozenset({"attn_row"}), None)
  ours = np.asarray(out.last["attn_row"])
  valid = mask.astype(bool)
  assert np.abs(ours - ref)[valid].max() <= 1e-5
  vis = ids == cfg.image_token_id
  for b in range(ids.shape[0]):  # same picks: top-8 visual tokens by the row
    pick = lambda row: set(np.flatnonzero(vis[b])[np.argsort(-row[vis[b]], kind="stable")[:8]])
    assert pick(ours[b]) == pick(ref[b])


def _until_eos(tokens, eos):
  """Tokens up to and including the first EOS of each row."""
  out = []
  for row in tokens:
    hit = np.flatnonzero(np.isin(row, eos))
    out.append(row[:hit[0] + 1] if hit.size else row)
  return out


@pytest.mark.parametrize("spec", ["entropy@2:5", "random@1:4", "divprune@0:6", "fastv@1:8",
                                  "divprune@0:10,random@2:3"])
def test_generation_matches_uncached_reference(tiny, spec):
  _, cfg, params, ids, mask, px = tiny
  sched = _resolved(cfg, spec)
  ours = generation.generate(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                             max_new_tokens=16, schedule=sched)
  kept = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                       schedule=sched).kept
  ref = greedy_reference(cfg, params, ids, px, mask, sched, kept, steps=16)
  eos = cfg.text.eos_token_ids
  for a, b in zip(_until_eos(ours, eos), _until_eos(ref, eos)):
    np.testing.assert_array_equal(a, b)


def test_pruned_decode_compiles_once(tiny):
  _, cfg, params, ids, mask, px = tiny
  sched = _resolved(cfg, "entropy@2:5")
  run = lambda x: generation.generate(cfg, params, input_ids=ids, pixel_values=x,
                                      attention_mask=mask, max_new_tokens=5, schedule=sched)
  run(px)
  sizes = generation._prefill._cache_size(), generation._decode._cache_size()
  run(px * 0.5)
  assert (generation._prefill._cache_size(), generation._decode._cache_size()) == sizes


def test_schedule_errors_name_the_problem(tiny):
  _, cfg, params, ids, mask, px = tiny
  fwd = lambda s: llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                                schedule=s)
  with pytest.raises(InputError, match=str(cfg.num_image_tokens)):
    fwd(f"entropy@2:{cfg.num_image_tokens + 1}")
  with pytest.raises(InputError):
    fwd("entropy@two:5")
  with pytest.raises(InputError):
    fwd("nosuchmethod@1:5")


def test_random_pruning_independent_of_batch_composition(tiny):
  """An example prunes the same way alone and in a batch when it keeps its example id."""
  _, cfg, params, ids, mask, px = tiny
  both = llava.forward(cfg, params, input_ids=ids, pixel_values=px, attention_mask=mask,
                       schedule="random@1:4,random@2:2", example_ids=[7, 11])
  alone = llava.forward(cfg, params, input_ids=ids[1:, 3:], pixel_values=px[1:],
                        schedule="random@1:4,random@2:2", example_ids=[11])
  for kb, ka in zip(both.kept, alone.kept):
    np.testing.assert_array_equal(np.asarray(kb)[1] - 3, np.asarray(ka)[0])
  np.testing.assert_allclose(np.asarray(both.logits)[1, -1], np.asarray(alone.logits)[0, -1],
                             atol=1e-5)
