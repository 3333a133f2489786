"""FLOPs accounting (pruning.md §8): hand-computed values, the worked check, and XLA's count."""
import jax
import jax.numpy as jnp
import pytest

from jaxmm import flops
from jaxmm.config import LlamaConfig, llava15_7b
from jaxmm.errors import InputError
from jaxmm.models import llama
from jaxmm.pruning import schedule

TINY = flops.Dims(num_layers=4, d=4, m=6, num_heads=2, num_kv_heads=1, head_dim=2)


def test_layer_flops_by_hand():
  # n=10, d=4, m=6: A = 4·10·16 + 2·100·4 + 2·10·4·6; B = 8·10·16 + 4·100·4 + 6·10·4·6.
  assert flops.layer_flops(10, TINY, "A") == 640 + 800 + 480 == 1920
  assert flops.layer_flops(10, TINY, "B") == 1280 + 1600 + 1440 == 4320
  # GQA, H=2, H_kv=1, d_h=2: 2·10·(4·4 + 2·4·2 + 4·4) + 4·100·4 + 6·10·4·6.
  assert flops.layer_flops(10, TINY, "gqa") == 960 + 1600 + 1440 == 4000


def test_schedule_totals_by_hand():
  # 4 text + 6 visual tokens, 4 layers; keep 2 before layer 1: n = 10, 6, 6, 6.
  s = schedule.parse("random@1:2")
  assert flops.tokens_per_layer(s, 4, 6, 4) == [10, 6, 6, 6]
  assert flops.per_layer(s, 4, 6, TINY, "A") == [1920, 960, 960, 960]
  assert flops.prefill_flops(s, 4, 6, TINY, "A") == 4800
  assert flops.prefill_flops((), 4, 6, TINY, "A") == 7680
  assert flops.reduction(s, 4, 6, TINY, "A") == pytest.approx(1 - 4800 / 7680)
  assert flops.prefill_flops(s, 4, 6, TINY, "B") == 4320 + 3 * 2208
  # Multi-stage with a percentage: 6 -> 3 (50%) at layer 1 -> 1 at layer 3: n = 10, 7, 7, 5.
  assert flops.tokens_per_layer(schedule.parse("random@1:50%,random@3:1"), 4, 6, 4) == [10, 7, 7, 5]


@pytest.mark.parametrize("keep, reduction_b, reduction_a", [
    (166, 60.6, 60.75), (98, 70.5, 70.59), (29, 80.4, 80.50)])
def test_worked_check_llava15_7b(keep, reduction_b, reduction_a):
  """§8: EntropyPrune K=2, n_text=64. The spec's 60.6/70.5/80.4 % are convention B; A is within
  0.2 points (the spec says 0.1 %; A's own values are pinned to 2 decimals)."""
  dims = flops.Dims.from_config(llava15_7b())
  s = schedule.parse(f"entropy@2:{keep}")
  assert round(100 * flops.reduction(s, 64, 576, dims, "B"), 1) == reduction_b
  assert round(100 * flops.reduction(s, 64, 576, dims, "A"), 2) == reduction_a


@pytest.mark.parametrize("layer, ratio", [(2, 57.1), (3, 58.5)])
def test_worked_check_fastv(layer, ratio):
  """§8: FastV R=50 % keeps 57.1 % (K=2) / 58.5 % (K=3) of the FLOPs, in FastV's convention A."""
  dims = flops.Dims.from_config(llava15_7b())
  s = schedule.parse(f"fastv@{layer}:50%")
  assert round(100 * (1 - flops.reduction(s, 64, 576, dims, "A")), 1) == ratio


def test_gqa_form_equals_b_for_mha_and_rejects_unknown():
  dims = flops.Dims.from_config(llava15_7b())
  assert flops.layer_flops(640, dims, "gqa") == flops.layer_flops(640, dims, "B")
  with pytest.raises(InputError, match="convention"):
    flops.layer_flops(10, TINY, "C")
  with pytest.raises(InputError, match="num_heads"):
    flops.layer_flops(10, flops.Dims(2, 4, 6), "gqa")


MHA = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=352, num_layers=3, num_heads=4,
                  num_kv_heads=4, head_dim=32)
GQA = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=352, num_layers=3, num_heads=4,
                  num_kv_heads=1, head_dim=32)


@pytest.mark.parametrize("cfg, convention", [(MHA, "B"), (GQA, "gqa")])
def test_xla_cost_analysis_agrees_with_analytic(cfg, convention):
  """XLA counts 2 FLOPs per multiply-add: it matches B (and the exact GQA form) within 10 %,
  and not A. Elementwise work (softmax, norms, RoPE, SiLU) makes XLA's count slightly larger."""
  dims = flops.Dims.from_config(cfg)
  for n in (40, 96):
    xla = flops.xla_layer_flops(cfg, n)
    assert abs(xla / flops.layer_flops(n, dims, convention) - 1) < 0.10
    assert xla / flops.layer_flops(n, dims, "A") > 2.0
  if convention == "gqa":   # the dense formula overcounts the K/V projections of GQA
    assert flops.layer_flops(96, dims, "B") > xla > flops.layer_flops(96, dims, "gqa")
  s = schedule.parse("random@1:8")
  xla_total = flops.xla_prefill_flops(cfg, s, 8, 32)   # n = 40, 16, 16
  assert abs(xla_total / flops.prefill_flops(s, 8, 32, dims, convention) - 1) < 0.10


def test_xla_counts_a_scanned_stack_once():
  """Why `xla_prefill_flops` sums single layers: the cost of the 3-layer `lax.scan` is reported
  as about one layer (HloCostAnalysis does not multiply a while body by its trip count)."""
  n = 40
  one = flops.xla_layer_flops(MHA, n)
  x = jax.ShapeDtypeStruct((1, n, MHA.hidden_size), jnp.float32)
  sc = (jnp.zeros((1, n, MHA.head_dim)),) * 2
  params = jax.eval_shape(lambda: llama.DecoderLayer(MHA).init(
      jax.random.key(0), jnp.zeros(x.shape), sc, jnp.ones((1, n, n), bool))["params"])
  stack = jax.tree.map(lambda p: jax.ShapeDtypeStruct((3,) + p.shape, p.dtype), params)
  pos, mask = jnp.zeros((1, n), jnp.int32), jnp.ones((1, n, n), bool)
  cost = jax.jit(lambda lp, x: llama.run_layers(MHA, lp, x, pos, mask).x).lower(stack, x).compile()
  assert cost.cost_analysis()["flops"] < 1.5 * one


def test_batch_flops_count_each_prompt_on_its_own_lengths():
  """Not the padded length: each prompt's own text, and its own visual tokens (a count keep is
  min(k, n_b), a percentage applies to n_b)."""
  from jaxmm.flops import Dims, batch_flops, batch_reduction, prefill_flops
  dims = Dims(32, 4096, 11008)
  got = batch_flops("entropy@2:98", [40, 64, 10], [576, 576, 60], dims)
  assert got == [prefill_flops("entropy@2:98", 40, 576, dims),
                 prefill_flops("entropy@2:98", 64, 576, dims),
                 prefill_flops("entropy@2:60", 10, 60, dims)]
  assert batch_flops("divprune@0:50%", [5, 5], [100, 40], dims) == [
      prefill_flops("divprune@0:50", 5, 100, dims), prefill_flops("divprune@0:20", 5, 40, dims)]
  assert batch_flops("entropy@2:98", [7], [0], dims) == [prefill_flops((), 7, 0, dims)]
  red = batch_reduction("entropy@2:98", [40, 64], [576, 576], dims)
  full = prefill_flops((), 40, 576, dims) + prefill_flops((), 64, 576, dims)
  assert red == 1 - sum(got[:2]) / full
