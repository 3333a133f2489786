"""The decoder as segments split at the pruning layers of a schedule.

A schedule of stages at layers K1 < K2 < ... cuts the stacked layers into [0, K1), [K1, K2), ...,
[Kn, L). Each segment is one `lax.scan` over a static slice of the stacked params with its own
static sequence length; between segments a pruning stage gathers the kept tokens. When a stage
needs quantities of layer K-1 (queries, the last token's attention row), that one layer runs with
opt-in capture; nothing else is computed for methods that do not ask.
"""
import flax.struct
import jax
import jax.numpy as jnp

from jaxmm.models import llama
from jaxmm.pruning import schedule as schedule_lib
from jaxmm.pruning import select
from jaxmm.pruning.state import TokenState


@flax.struct.dataclass
class Segment:
  """One segment's prefill result: its token state and, when generating, its KV cache."""
  state: TokenState
  kv: tuple | None        # (k, v) f[L_seg, B, S_seg, G, K], S_seg = N_seg + max_new_tokens
  kv_valid: jax.Array | None   # bool[B, S_seg]


def layer_ranges(schedule, num_layers: int) -> list[tuple[int, int]]:
  """The non-empty layer ranges [start, end) between the stages' layers."""
  bounds = [0, *(s.layer for s in schedule), num_layers]
  return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _empty_kv(cfg, n_layers, b, s, dtype):
  shape = (n_layers, b, s, cfg.num_kv_heads, cfg.head_dim)
  return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def run_range(cfg, layers_p, state, start, end, needs=frozenset(), max_new=None):
  """Layers [start, end) on `state` as one scan; the last layer's `needs` are captured.

  Returns (Segment, aux): aux maps each need to its capture from layer end-1 (see attention)."""
  b, n = state.valid.shape
  kv_valid = None if max_new is None else jnp.concatenate(
      [state.valid, jnp.zeros((b, max_new), bool)], axis=1)
  valid = state.valid if kv_valid is None else kv_valid
  mask = llama.attention_mask(jnp.broadcast_to(jnp.arange(n), (b, n)), valid)
  kv = None if max_new is None else _empty_kv(cfg, end - start, b, n + max_new, state.hidden.dtype)
  x, kv, *aux = llama.run_layers(cfg, layers_p, state.hidden, state.positions, mask, kv,
                                 start=start, end=end, capture=tuple(sorted(needs)))
  return Segment(state.replace(hidden=x), kv, kv_valid), (aux[0] if aux else {})


def prefill(cfg, layers_p, state: TokenState, schedule, keys_B, max_new=None):
  """Runs all layers over the prompt, pruning per the (resolved) schedule.

  keys_B: one PRNG key per example (random pruning draws from the example's own key, so an
  example prunes the same way alone or in any batch).
  Returns (segments, kept): one Segment per layer range (its state holds the hidden states
  leaving the segment), and per stage the original indices i32[B, k] of the kept visual tokens.
  `max_new=None` skips the KV caches (plain forward).
  """
  segments, kept, start = [], [], 0
  for i, stage in enumerate(schedule):
    aux = {}
    if stage.layer > start:  # resolve() guarantees increasing layers and K >= 1 for needs
      needs = schedule_lib.needs((stage,))
      seg, aux = run_range(cfg, layers_p, state, start, stage.layer, needs, max_new)
      segments.append(seg)
      state = seg.state
    stage_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys_B)
    state = select.apply_stage(stage, state, aux, stage_keys)
    kept.append(select.kept_indices(state))
    start = stage.layer
  seg, _ = run_range(cfg, layers_p, state, start, cfg.num_layers, frozenset(), max_new)
  return segments + [seg], tuple(kept)
