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
