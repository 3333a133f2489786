"""The generic forward of the decoder families: host-side checks, one jitted prefill, logits.

  forward(family_name, cfg, params, **inputs)   inputs named as the transformers model names them

The family (`models.family`) checks and normalises its inputs on the host and builds the
`TokenState`; the schedule is resolved against each example's own visual-token count (padded
capacity); `segments.prefill` runs the decoder. No model family is imported here: families are
found by name through `jaxmm.registry`.
"""
import functools

import jax

from jaxmm import inputs as inputs_lib
from jaxmm import registry, sharding
from jaxmm.errors import InputError
from jaxmm.models import segments
from jaxmm.models.family import Prepared
from jaxmm.models.outputs import CausalLMOutput
from jaxmm.pruning import schedule as schedule_lib


def prepare(name: str, cfg, inputs: dict) -> Prepared:
  """The family's host-side checks, after rejecting argument names it does not take."""
  fam = registry.family_module(name)
  unknown = sorted(k for k, v in inputs.items() if k not in fam.INPUTS and v is not None)
  if unknown:
    raise InputError(f"{name} takes {sorted(fam.INPUTS)}; got unknown input(s) {unknown}")
  if inputs.get("input_ids") is None:
    raise InputError("input_ids is required")
  return fam.prepare(cfg, inputs)


def resolve(name: str, cfg, prepared: Prepared, schedule):
  """The schedule with static counts for this batch (`pruning.schedule.resolve`), or ()."""
  if not schedule:
    return ()
  if isinstance(schedule, str):
    schedule = schedule_lib.parse(schedule)
  if prepared.visual_B.max(initial=0) == 0:
    raise InputError("a pruning schedule needs visual tokens; these inputs hold none")
  dec = registry.family_module(name).decoder(cfg)
  seq_len = prepared.arrays["input_ids"].shape[1]
  return schedule_lib.resolve(schedule, prepared.visual_B, dec.num_layers, seq_len)


def decoder_of(name: str, cfg, params):
  """(decoder, its params subtree) of a family's model."""
  fam = registry.family_module(name)
  return fam.decoder(cfg), fam.decoder_params(params)


@functools.partial(jax.jit, static_argnames=("name", "cfg", "schedule", "capture"))
def _forward(name, cfg, params, arrays, keys, schedule, capture=None):
  fam = registry.family_module(name)
  dec, dp = decoder_of(name, cfg, params)
  state = fam.token_state(cfg, params, arrays)
  pre = segments.prefill(dec, dp, state, schedule, keys, stack=capture.names() if capture else ())
  final = pre.segments[-1].state
  logits = dec.logits(dp, final.hidden)
  if schedule:
    return CausalLMOutput(logits=logits, kept=pre.kept, origin=final.origin)
  if capture is None:
    return CausalLMOutput(logits=logits)
  ys = dict(pre.stacked)
  if "hidden" in ys:   # entry l is the hidden state entering layer l; the last leaves layer L-1
    ys["hidden"] = jax.numpy.concatenate([state.hidden[None], ys["hidden"]], axis=0)
  ys["visual"] = state.visual & state.valid
  return CausalLMOutput(logits=logits, captured=ys)


def forward(name: str, cfg, params, *, schedule=None, seed: int = 0, example_ids=None,
            capture=None, **inputs):
  """Logits of a decoder family's model; inputs as numpy or jax arrays, transformers' names.

  Returns CausalLMOutput(logits f32[B, T, V]). With a pruning `schedule` (text such as
  "entropy@2:98" or parsed; random pruning draws from fold_in(PRNGKey(seed), example id),
  `example_ids` defaulting to the row numbers) the logits cover the T' slots left after the
  last stage, `origin` i32[B, T'] gives their index in the unpruned sequence (slots of
  examples with fewer visual tokens than the batch's most are padding: see `valid` of the
  prefill) and `kept` holds, per stage, the original indices i32[B, k] of the kept visual
  tokens, padded with -1. `capture`: an `analysis.capture.Capture` (unpruned only) fills
  `captured`; see that module.
  """
  prepared = prepare(name, cfg, inputs)
  sched = resolve(name, cfg, prepared, schedule)
  if capture is not None and sched:
    raise InputError("capture runs the unpruned forward; it cannot be combined with a schedule")
  b = prepared.arrays["input_ids"].shape[0]
  # Under an active mesh (`sharding.activate`) the batch is split along `data`.
  arrays, keys = sharding.place_batch(
      (prepared.arrays, inputs_lib.example_keys(seed, b, example_ids)), b)
  if capture is None:  # the call (and its jit cache entry) is exactly the plain forward's
    return _forward(name, cfg, params, arrays, keys, sched)
  return _forward(name, cfg, params, arrays, keys, sched, capture)

