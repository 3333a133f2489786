"""The token state that flows between decoder segments, and which pruning stages shrink."""
import flax.struct
import jax


@flax.struct.dataclass
class TokenState:
  """Per batch. Methods score one example (no B axis) and are vmapped over the batch.

  hidden     f[B, N, D]   hidden states entering the next layer
  positions  i32[B, N]    rotary position ids
  valid      bool[B, N]   padding mask (left padding is normal)
  visual     bool[B, N]   visual tokens, the only ones that may be dropped (visual implies valid)
  origin     i32[B, N]    index of each slot in the unpruned sequence

  n_visual: static (not a pytree leaf) number of visual tokens per example, the same for every
  example, or None when unknown. Pruning needs it to give the output a static length; `prune`
  sets it on its output, so states leaving a stage always carry it.
  """
  hidden: jax.Array
  positions: jax.Array
  valid: jax.Array
  visual: jax.Array
  origin: jax.Array
  n_visual: int | None = flax.struct.field(pytree_node=False, default=None)
