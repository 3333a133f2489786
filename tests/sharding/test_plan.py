"""`jaxmm plan`: parameter counts computed by hand, per-device bytes divided as the rules say,
KV cache under a schedule, and one-line errors. Shapes only: nothing is allocated."""
import json

import pytest

from jaxmm import cli, plan, sharding
from jaxmm.errors import ConfigError


def _llama(d, f, layers, vocab, kv=None, bias=0):
  """A LLaMA decoder's parameters: embed + head + per layer (4 attention matrices, 3 MLP, 2
  norms) + the final norm; `kv` the K/V width (GQA), `bias` per-layer q/k/v bias size."""
  kv = kv or d
  per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d + bias
  return 2 * vocab * d + layers * per_layer + d


CLIP_L_336 = (3 * 14 * 14 * 1024 + 1024 + 577 * 1024 + 2 * 1024              # embeddings, pre-LN
              + 24 * (4 * (1024 * 1024 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024))


def _llava(d, f, layers):
  return CLIP_L_336 + (1024 * d + d) + (d * d + d) + _llama(d, f, layers, 32064)


def test_parameter_counts_match_the_hand_computed_ones():
  want = {"llava-1.5-7b": _llava(4096, 11008, 32), "llava-1.5-13b": _llava(5120, 13824, 40),
          "llava-1.6-7b": _llava(4096, 11008, 32) + 4096}     # + image_newline
  for name, n in want.items():
    p = plan.plan(name, {"data": 1, "model": 1}, "dp", 1, None, "bfloat16")
    assert p["params"] == n, name
  assert want["llava-1.5-7b"] == 7_063_425_024
  assert round(want["llava-1.5-13b"] / 1e9, 2) == 13.35
  qwen = plan.plan("qwen2.5-vl-7b", {"data": 1, "model": 1}, "dp", 1, None, "bfloat16")
  assert qwen["params"] == 8_292_166_656        # computed by hand in test_qwen2_vl.py


def test_per_device_bytes_divide_as_the_rules_say():
  one = plan.plan("llava-1.5-7b", {"data": 1, "model": 1}, "dp", 8, 2048, "bfloat16")
  assert one["per_device_bytes"]["params"] == 2 * one["params"]
  dp = plan.plan("llava-1.5-7b", {"data": 2, "model": 4}, "dp", 8, 2048, "bfloat16")
  assert dp["per_device_bytes"]["params"] == 2 * one["params"]          # replicated
  # KV: 32 layers x 2 x batch 4 per device x 2048 x 4096 x 2 bytes
  assert dp["per_device_bytes"]["kv_cache"] == 32 * 2 * 4 * 2048 * 4096 * 2
  p = one["params"]
  fsdp = plan.plan("llava-1.5-7b", {"data": 2, "model": 4}, "fsdp", 8, 2048, "bfloat16")
  # fsdp splits every leaf with a vocabulary or embedding axis 8 ways; biases of attention
  # heads and MLP widths (CLIP's q/k/v and fc1, the projector's fc1) stay whole.
  whole = 24 * (3 * 1024 + 4096) + 4096
  assert fsdp["per_device_bytes"]["params"] == 2 * ((p - whole) // 8 + whole)
  tp = plan.plan("llava-1.5-7b", {"data": 2, "model": 4}, "tp", 8, 2048, "bfloat16")
  # tp splits heads, K/V, MLP widths and the vocabulary 4 ways; what has none stays whole:
  whole = (4096 * (2 * 32 + 1)                                         # LLaMA norms
           + 14 * 14 * 3 * 1024 + 1024 + 577 * 1024 + 2 * 1024         # CLIP embeddings, pre-LN
           + 24 * 6 * 1024                                             # CLIP LNs, o/fc2 biases
           + 4096)                                                     # projector fc2 bias
  assert tp["per_device_bytes"]["params"] == 2 * ((p - whole) // 4 + whole)


def test_a_schedule_shrinks_the_kv_cache_of_the_layers_after_it():
  base = dict(mesh={"data": 1, "model": 1}, preset="dp", batch=1, seq=1000, dtype="float32")
  p = plan.plan("llava-1.5-7b", **base, schedule="divprune@0:284,random@5:38")
  # layers 0-4 hold 1000 - 576 + 284 = 708 tokens, layers 5-31 hold 708 - 284 + 38 = 462
  per_token_layer = 2 * 4096 * 4
  assert p["per_device_bytes"]["kv_cache"] == per_token_layer * (5 * 708 + 27 * 462)
  assert p["kv_cache_unpruned_per_device_bytes"] == per_token_layer * 32 * 1000


def test_cli_json_and_errors(capsys):
  assert cli.main(["plan", "--config", "qwen2.5-vl-72b", "--mesh", "data=2,model=4",
                   "--sharding", "tp", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["params"] > 7e10 and out["per_device_bytes"]["params"] < 2 * out["params"] / 3
  assert cli.main(["plan", "--config", "llava-1.6-7b", "--mesh", "data=2,model=4"]) == 0
  assert "parameters" in capsys.readouterr().out
  for argv, needle in [(["--mesh", "data=2,pipe=4"], "malformed --mesh"),
                       (["--seq", "100"], "does not fit"),
                       (["--schedule", "entropy@2:900"], "only 576 enter it")]:
    assert cli.main(["plan", "--config", "llava-1.5-7b", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err


def test_mesh_text_is_parsed_strictly():
  assert sharding.parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
  assert sharding.parse_mesh("model=8") == {"data": 1, "model": 8}
  for bad in ("", "data=0", "data=2,data=2", "rows=2", "data:2"):
    with pytest.raises(ConfigError):
      sharding.parse_mesh(bad)


def test_a_model_folder_is_planned_from_its_stored_config(tmp_path, capsys):
  import jax
  import numpy as np
  from jaxmm.checkpoint import save_model
  from jaxmm.models import llava
  from tiny_hf import tiny_llava_config
  cfg = tiny_llava_config()
  params = llava.init_params(cfg, jax.random.PRNGKey(0))
  save_model(tmp_path / "m", "llava", cfg.to_dict(), params)
  p = plan.plan(str(tmp_path / "m"), {"data": 1, "model": 1}, "dp", 2, 64, "float32")
  assert p["family"] == "llava" and p["visual"] == 16
  assert p["params"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert p["per_device_bytes"]["kv_cache"] == 3 * 2 * 2 * 64 * 2 * 12 * 4   # L, k+v, B, T, G, dh
  assert cli.main(["plan", "--config", str(tmp_path / "nope")]) == 2
  assert "unknown config" in capsys.readouterr().err
