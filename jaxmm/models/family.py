"""The family interface: what generic code needs of a model family (llama, llava, ...).

A family is a module (found by name through `jaxmm.registry`) that provides:

  Config                         its frozen config dataclass (`from_hf`, `to_dict`/`from_dict`)
  NAME, INPUTS                   its registry name; the transformers argument names it reads
  prepare(cfg, inputs) -> Prepared
                                 host-side checks on NumPy inputs named as the transformers model
                                 names them, before anything goes to the device
  token_state(cfg, params, arrays) -> TokenState
                                 merged embeddings, visual mask, positions (jittable)
  decoder(cfg) -> Decoder        its decoder (`models.decoder`), and decoder_params(params)
  init_params(cfg, key)          fresh params, usable under `jax.eval_shape`
  rules(cfg)                     the converter's name table (`jaxmm.converters.common.Rule`s), whose
                                 leaves and shapes equal `init_params`'

Generic code (`models.core`, `models.segments`, `generation`, pruning) uses nothing else.
Vision-language families also provide, for the analyses and `prune-bench --show-kept`:

  visual_grids(cfg, inputs) -> list[list[i32[rows, cols]]]
                                 per example, the 2-D grids of its visual tokens (each image's
                                 own, in the order they appear), as sequence slots of input_ids
"""
import dataclasses
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Checked inputs. `arrays` go to the jitted forward: input_ids i32[B, T], attention_mask
  bool[B, T], position_ids i32[B, T] (or [B, T, 3]) and the family's extras (pixel_values...).
  visual_B / text_B: host ints, each example's visual and valid non-visual token counts
  (visual_B sizes the pruned sequences statically, see `pruning.schedule.resolve`; text_B
  counts each prompt's own text, e.g. for FLOPs)."""
  arrays: dict
  visual_B: np.ndarray
  text_B: np.ndarray


class Family(Protocol):
  """See the module docstring."""
  NAME: str
  INPUTS: frozenset

  def prepare(self, cfg, inputs: dict) -> Prepared: ...

  def token_state(self, cfg, params, arrays: dict): ...

  def decoder(self, cfg): ...

  def decoder_params(self, params) -> dict: ...

  def init_params(self, cfg, key) -> dict: ...

  def rules(self, cfg) -> list: ...


def image_runs(placeholder_BxT, counts) -> list[tuple[int, np.ndarray]]:
  """(example, slots i64[n_i]) per image: the placeholder slots in batch order (row-major over
  the flattened batch, as transformers' `masked_scatter` fills them) cut into consecutive runs
  of `counts[i]` (inputs already checked by the family's `prepare`)."""
  ph = np.asarray(placeholder_BxT, bool)
  flat, t = np.flatnonzero(ph.reshape(-1)), ph.shape[1]
  ends = np.cumsum(counts, dtype=np.int64)
  return [(int(run[0] // t), run % t) for run in np.split(flat, ends[:-1]) if len(run)]


def by_example(batch: int, grids) -> list[list[np.ndarray]]:
  """Groups (example, grid of slots) pairs per example, each example's grids ordered by their
  first slot."""
  out = [[] for _ in range(batch)]
  for b, g in sorted(grids, key=lambda bg: (bg[0], int(bg[1].reshape(-1)[0]))):
    out[b].append(np.asarray(g, np.int32))
  return out
