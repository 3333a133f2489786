"""Prefill FLOPs of the decoder layers under a pruning schedule (pruning.md §8).

Only decoder-layer prefill FLOPs are counted (no vision tower, projector, LM head or decoding),
as in the reference codebases. Per layer, for n tokens, width d and FFN width m:

  "A"    f_A(n) = 4nd^2 + 2n^2 d + 2ndm   FastV paper / DivPrune tflops.py: multiply-adds, 2-matrix FFN
  "B"    f_B(n) = 8nd^2 + 4n^2 d + 6ndm   EntropyPrune counter: 2 FLOPs per multiply-add, SwiGLU FFN
  "gqa"  2n(d·H d_h + 2·d·H_kv d_h + H d_h·d) + 4n^2 H d_h + 6ndm   (B-style, exact for GQA; == B for MHA)

Both attention products are counted over the full n x n square (no causal halving), which is
what the dense masked attention computes. XLA's cost analysis counts a multiply-add as 2 FLOPs,
so "B"/"gqa" are the conventions that describe what the compiled code does (`xla_layer_flops`
cross-checks them; "A" is about 0.4x of it). A schedule's total is Σ_l f(n_text + N_vis(l)).
"""
import dataclasses

import jax
import jax.numpy as jnp

from jaxmm.errors import InputError
from jaxmm.pruning import schedule as schedule_lib

CONVENTIONS = ("A", "B", "gqa")


@dataclasses.dataclass(frozen=True)
class Dims:
  """Decoder sizes that the FLOPs formulas need."""
  num_layers: int
  d: int                   # hidden size
  m: int                   # FFN (intermediate) width
  num_heads: int = 0       # only for "gqa"
  num_kv_heads: int = 0
  head_dim: int = 0

  @classmethod
  def from_config(cls, cfg) -> "Dims":
    """From a LlamaConfig (or a LlavaConfig: its language model)."""
    t = getattr(cfg, "text", cfg)
    return cls(t.num_layers, t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads,
               t.head_dim)


def layer_flops(n: int, dims: Dims, convention: str = "B") -> int:
  """FLOPs of one decoder layer over n tokens."""
  d, m = dims.d, dims.m
  if convention == "A":
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
  if convention == "B":
    return 8 * n * d * d + 4 * n * n * d + 6 * n * d * m
  if convention == "gqa":
    if not dims.num_heads:
      raise InputError("the gqa FLOPs convention needs num_heads, num_kv_heads and head_dim")
    hk, gk = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    return 2 * n * (d * hk + 2 * d * gk + hk * d) + 4 * n * n * hk + 6 * n * d * m
  raise InputError(f"unknown FLOPs convention {convention!r} (known: {', '.join(CONVENTIONS)})")


def tokens_per_layer(schedule, n_text: int, n_visual: int, num_layers: int) -> list[int]:
  """n(l) = n_text + N_vis(l) for l = 0..L-1 (percentages in `schedule` are resolved here)."""
  sched = schedule_lib.resolve(schedule, n_visual, num_layers) if schedule else ()
  vis = schedule_lib.visual_per_layer(sched, num_layers, n_visual)
  return [n_text + v for v in vis]


def per_layer(schedule, n_text: int, n_visual: int, dims: Dims, convention: str = "B") -> list[int]:
  """FLOPs of each decoder layer under the schedule (empty schedule = unpruned)."""
  return [layer_flops(n, dims, convention)
          for n in tokens_per_layer(schedule, n_text, n_visual, dims.num_layers)]


def prefill_flops(schedule, n_text: int, n_visual: int, dims: Dims, convention: str = "B") -> int:
  """Σ_l f(n_text + N_vis(l))."""
  return sum(per_layer(schedule, n_text, n_visual, dims, convention))


def reduction(schedule, n_text: int, n_visual: int, dims: Dims, convention: str = "B") -> float:
  """1 - F(schedule) / F(unpruned)."""
  full = prefill_flops((), n_text, n_visual, dims, convention)
  return 1 - prefill_flops(schedule, n_text, n_visual, dims, convention) / full


def batch_flops(schedule, n_text_B, n_visual_B, dims: Dims, convention: str = "B") -> list[int]:
  """Per example, the prefill FLOPs of its own prompt: its own text length and visual count (a
  count keep is min(k, n_b) of them, a percentage applies to n_b), not the padded batch's."""
  out = []
  for t, n in zip(n_text_B, n_visual_B):
    s = schedule_lib.for_example(schedule, int(n), dims.num_layers) if schedule and n else ()
    out.append(prefill_flops(s, int(t), int(n), dims, convention))
  return out


def batch_reduction(schedule, n_text_B, n_visual_B, dims: Dims, convention: str = "B") -> float:
  """1 - mean_b F_b(schedule) / mean_b F_b(unpruned), over the prompts' own lengths."""
  full = sum(batch_flops((), n_text_B, n_visual_B, dims, convention))
  return 1 - sum(batch_flops(schedule, n_text_B, n_visual_B, dims, convention)) / full


def xla_layer_flops(cfg, n: int, batch: int = 1) -> float:
  """XLA's cost-analysis FLOPs of one compiled decoder layer (`llama.run_layers`) over n tokens.

  XLA's HloCostAnalysis counts a while loop's body once, not times its trip count, so the scanned
  L-layer stack reports about one layer; a stack's count is therefore L x this (or Σ over the
  segments' lengths), see `xla_prefill_flops`. Nothing is executed: only lowered and compiled.
  """
  from jaxmm.models import llama   # local: the model imports the pruning package
  t = getattr(cfg, "text", cfg)
  x = jax.ShapeDtypeStruct((batch, n, t.hidden_size), jnp.dtype(t.dtype))
  sc = (jnp.zeros((batch, n, t.head_dim)),) * 2
  mask = jax.ShapeDtypeStruct((batch, n, n), jnp.bool_)
  params = jax.eval_shape(lambda: llama.DecoderLayer(t).init(
      jax.random.key(0), jnp.zeros(x.shape, x.dtype), sc, jnp.ones(mask.shape, bool))["params"])
  layers = jax.tree.map(lambda p: jax.ShapeDtypeStruct((1,) + p.shape, p.dtype), params)
  pos = jax.ShapeDtypeStruct((batch, n), jnp.int32)
  fn = jax.jit(lambda lp, x, pos, mask: llama.run_layers(t, lp, x, pos, mask).x)
  cost = fn.lower(layers, x, pos, mask).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def xla_prefill_flops(cfg, schedule, n_text: int, n_visual: int) -> float:
  """Σ_l of XLA's per-layer count at each layer's token count (one compile per distinct n)."""
  t = getattr(cfg, "text", cfg)
  ns = tokens_per_layer(schedule, n_text, n_visual, t.num_layers)
  per_n = {n: xla_layer_flops(cfg, n) for n in set(ns)}
  return sum(per_n[n] for n in ns)
