"""The one prefill path: the decoder as segments split at the pruning layers of a schedule.

A schedule of stages at layers K1 < K2 < ... cuts the stacked layers into [0, K1), [K1, K2), ...,
[Kn, L). Each segment is one `lax.scan` over a static slice of the stacked params with its own
static sequence length; between segments a pruning stage gathers the kept tokens. When a stage
needs quantities of layer K-1 (queries, the last token's attention row), that one layer runs with
opt-in capture; nothing else is computed for methods that do not ask. Unpruned is the empty
schedule. Captures are options of the same path: `stack` (per-layer values, unpruned only) and
`probes` (values of chosen layers, which cut the ranges there as a stage does).

Only the decoder interface (`models.decoder`) is used: no model family is imported here.
"""
import flax.struct
import jax
import jax.numpy as jnp

from jaxmm import sharding
from jaxmm.models.decoder import Decoder, attention_mask
from jaxmm.pruning import schedule as schedule_lib
from jaxmm.pruning import select
from jaxmm.pruning.state import TokenState


@flax.struct.dataclass
class Segment:
  """One segment's prefill result: its layer range, its token state and, when generating, its
  KV cache."""
  state: TokenState
  kv: tuple | None        # (k, v) f[L_seg, B, S_seg, G, K], S_seg = N_seg + max_new_tokens
  kv_valid: jax.Array | None   # bool[B, S_seg]
  start: int = flax.struct.field(pytree_node=False, default=0)
  end: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class Prefill:
  """segments: one per layer range (each state holds the hidden states leaving it); kept: per
  stage i32[B, k] original indices of the kept visual tokens (-1 padded); stacked: the `stack`
  captures f[L, ...]; probed: {layer: {name: value}} of the `probes`."""
  segments: list
  kept: tuple
  stacked: dict
  probed: dict


def layer_ranges(schedule, num_layers: int) -> list[tuple[int, int]]:
  """The non-empty layer ranges [start, end) between the stages' layers."""
  bounds = [0, *(s.layer for s in schedule), num_layers]
  return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def run_range(dec: Decoder, params, state: TokenState, start: int, end: int,
              needs=frozenset(), max_new=None, stack=()):
  """Layers [start, end) on `state` as one scan; the last layer's `needs` are captured.

  Returns (Segment, LayersOut): `.last` maps each need to its capture from layer end-1.
  `max_new=None` builds no KV cache (plain forward)."""
  b, n = state.valid.shape
  kv_valid = None if max_new is None else jnp.concatenate(
      [state.valid, jnp.zeros((b, max_new), bool)], axis=1)
  valid = state.valid if kv_valid is None else kv_valid
  mask = attention_mask(jnp.broadcast_to(jnp.arange(n), (b, n)), valid)
  kv = None
  if max_new is not None:
    shape = (end - start, *dec.kv_shape(b, n + max_new))
    # On a mesh the caches are split by batch (each decoder layer pins its input the same way).
    zeros = sharding.constrain(jnp.zeros(shape, state.hidden.dtype), None, "batch")
    kv = (zeros, zeros)
  out = dec.run(params, state.hidden, state.positions, mask, kv, 0, start, end,
                capture=tuple(sorted(needs)), stack=tuple(stack))
  return Segment(state.replace(hidden=out.x), out.kv, kv_valid, start, end), out


def _cuts(schedule, probes, num_layers: int) -> list[int]:
  """Where ranges end: each stage's layer, after each probed layer, and at L."""
  return sorted({s.layer for s in schedule} | {l + 1 for l in probes} | {num_layers})


def prefill(dec: Decoder, params, state: TokenState, schedule, keys_B, max_new=None,
            stack=(), probes=None) -> Prefill:
  """Runs all layers over the prompt, pruning per the (resolved) schedule.

  keys_B: one PRNG key per example (random pruning draws from the example's own key, so an
  example prunes the same way alone or in any batch). `stack`: per-layer capture names
  (`decoder.STACK_CAPTURES`), only without pruning. `probes`: {layer: names} of carry captures
  (`decoder.CARRY_CAPTURES`) to return from those layers.
  """
  probes = probes or {}
  if stack and schedule:
    raise ValueError("per-layer captures run the unpruned prefill; the schedule must be empty")
  stages = {s.layer: (i, s) for i, s in enumerate(schedule)}
  segments, kept, stacks, probed, start = [], [], [], {}, 0
  for cut in _cuts(schedule, probes, dec.num_layers):
    last = {}
    if cut > start:   # resolve() guarantees increasing layers and K >= 1 for needs
      needs = set(probes.get(cut - 1, ()))
      if cut in stages:
        needs |= schedule_lib.needs((stages[cut][1],))
      seg, out = run_range(dec, params, state, start, cut, needs, max_new, stack)
      segments.append(seg)
      stacks.append(out.stacked)
      state, last = seg.state, out.last
      if cut - 1 in probes:
        probed[cut - 1] = {k: last[k] for k in probes[cut - 1]}
    if cut in stages:
      i, stage = stages[cut]
      stage_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys_B)
      state = select.apply_stage(stage, state, last, stage_keys)
      kept.append(select.kept_indices(state))
    start = cut
  stacked = {k: jnp.concatenate([s[k] for s in stacks], axis=0) for k in stack}
  return Prefill(segments, tuple(kept), stacked, probed)
