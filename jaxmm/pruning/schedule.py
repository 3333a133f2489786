"""Pruning schedules: the `METHOD@LAYER:KEEP[,...]` text form, budgets, and host-side validation.

A schedule is a tuple of frozen `Stage`s, hashable so that it can be a static jit argument.
`parse` reads the text form; `resolve` turns percentages into counts and checks the schedule
against a model (number of layers) and an input (visual tokens per example); `from_budget`
converts a layer-averaged visual-token budget into a keep count (pruning.md §3.2).
"""
import dataclasses
import fractions
import json
import math
import re
from pathlib import Path

import numpy as np

from jaxmm.errors import InputError
from jaxmm.pruning import divprune, entropy, fastv
from jaxmm.pruning import random as random_method

METHODS = {"entropy": entropy, "random": random_method, "divprune": divprune, "fastv": fastv}
# pruning.md §1 / §10.7: each method's reference convention for position ids after pruning.
DEFAULT_POSITIONS = {"entropy": "preserve", "fastv": "preserve", "divprune": "compact",
                     "random": "compact"}
POSITIONS = ("preserve", "compact")
# EntropyPrune's pruning layer K per model type (pruning.md §3.2, the reference code's
# settings): scores from layer K-1, so K=2 removes tokens before layer 2.
ENTROPY_LAYER = {"llava": 2, "llava_next": 2, "qwen2_5_vl": 1}


def entropy_layer(model_type: str) -> int:
  """EntropyPrune's K for a model type (`ENTROPY_LAYER`); 2, the LLaVA setting, otherwise."""
  return ENTROPY_LAYER.get(model_type, 2)


@dataclasses.dataclass(frozen=True)
class Stage:
  """Prune before decoder layer `layer` (0 = at the LLM input), keeping `keep` visual tokens.

  keep: a count, or a percentage string such as "25%" of the visual tokens entering the stage.
  Set by `resolve` (None before), so that every length is a static number:
    visual_in: the visual capacity entering (the most visual tokens any example holds); keep
      becomes the count kept at that capacity, and `percent` remembers a percentage, which each
      example applies to its own count (a count keeps min(keep, n_b));
    out_len: the sequence length leaving the stage when the batch's length was given: the
      longest example's (None: N - visual_in + keep, right when every example holds visual_in).
  """
  method: str
  layer: int
  keep: int | str
  positions: str = "preserve"
  visual_in: int | None = None
  percent: str | None = None
  out_len: int | None = None

  def __str__(self):
    return f"{self.method}@{self.layer}:{self.keep}"


Schedule = tuple[Stage, ...]

_STAGE_RE = re.compile(r"^([A-Za-z_]+)@(-?\d+):(-?\d+(?:\.\d+)?%?)$")


def min_layer(method: str) -> int:
  """Methods that score from layer K-1 quantities (queries, attention) need K >= 1."""
  return 1 if METHODS[method].NEEDS else 0


def _check_method(method: str, where: str) -> None:
  if method not in METHODS:
    raise InputError(f"schedule stage {where!r}: unknown method {method!r} "
                     f"(known: {', '.join(sorted(METHODS))})")


def _check_positions(positions: str) -> None:
  if positions not in POSITIONS:
    raise InputError(f"positions must be one of {POSITIONS}, got {positions!r}")


def _parse_keep(text: str, where: str) -> int | str:
  if text.endswith("%"):
    pct = float(text[:-1])
    if not 0 <= pct <= 100:
      raise InputError(f"schedule stage {where!r}: keep percentage {text} is not in [0%, 100%]")
    return text
  if "." in text or int(text) < 0:
    raise InputError(f"schedule stage {where!r}: keep must be a count >= 0 or a percentage, got {text!r}")
  return int(text)


def _parse_stage(part: str, positions: str | None) -> Stage:
  m = _STAGE_RE.match(part)
  if not m:
    raise InputError(f"schedule stage {part!r} is malformed: expected METHOD@LAYER:KEEP, "
                     "e.g. entropy@2:98 or fastv@2:50%")
  method, layer = m.group(1).lower(), int(m.group(2))
  _check_method(method, part)
  if layer < min_layer(method):
    raise InputError(f"schedule stage {part!r}: {method} scores from layer K-1, so its layer must "
                     f"be >= {min_layer(method)}, got {layer}")
  return Stage(method, layer, _parse_keep(m.group(3), part),
               positions or DEFAULT_POSITIONS[method])


def _check_order(schedule: Schedule) -> None:
  for a, b in zip(schedule, schedule[1:]):
    if b.layer <= a.layer:
      raise InputError(f"schedule stages must have strictly increasing layers: {a} then {b}")


def read_file(text: str) -> str:
  """The schedule text of "@FILE": a JSON object's "schedule" (what `jaxmm calibrate` writes)."""
  path = Path(text[1:])
  try:
    obj = json.loads(path.read_text())
  except FileNotFoundError:
    raise InputError(f"schedule file {path} does not exist") from None
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"schedule file {path} is not readable JSON: {e}") from None
  if not isinstance(obj, dict) or not isinstance(obj.get("schedule"), str):
    raise InputError(f"schedule file {path} has no \"schedule\" text")
  return obj["schedule"]


def parse(text: str, positions: str | None = None) -> Schedule:
  """Parses "METHOD@LAYER:KEEP[,METHOD@LAYER:KEEP...]", or "@FILE" (a JSON file with that text
  under "schedule"); `positions` overrides each method's default."""
  if positions is not None:
    _check_positions(positions)
  if isinstance(text, str) and text.strip().startswith("@"):
    text = read_file(text.strip())
  if not isinstance(text, str) or not text.strip():
    raise InputError(f"empty pruning schedule {text!r}: expected METHOD@LAYER:KEEP[,...]")
  parts = [p.strip() for p in text.split(",")]
  if any(not p for p in parts):
    raise InputError(f"schedule {text!r} has an empty stage (stray comma)")
  schedule = tuple(_parse_stage(p, positions) for p in parts)
  _check_order(schedule)
  return schedule


def keep_count(keep: int | str, n_in: int) -> int:
  """A count as is; a percentage of the `n_in` entering tokens, rounded half up (exactly)."""
  if isinstance(keep, str):
    return math.floor(fractions.Fraction(keep.rstrip("%")) * n_in / 100 + fractions.Fraction(1, 2))
  return keep


def _resolve_stage(stage: Stage, n_in: int, num_layers: int) -> Stage:
  _check_method(stage.method, str(stage))
  _check_positions(stage.positions)
  if not min_layer(stage.method) <= stage.layer < num_layers:
    raise InputError(f"schedule stage {stage}: layer must be in [{min_layer(stage.method)}, "
                     f"{num_layers - 1}] for this {num_layers}-layer model")
  pct = stage.keep if isinstance(stage.keep, str) else stage.percent
  k = keep_count(pct or stage.keep, n_in)   # a resolved stage re-resolves from its percentage
  if not isinstance(k, int) or not 0 <= k <= n_in:
    raise InputError(f"schedule stage {stage}: keeps {k} visual tokens but only {n_in} enter it")
  return dataclasses.replace(stage, keep=k, visual_in=n_in, percent=pct)


def keep_for(stage: Stage, n: int) -> int:
  """What an example with n visual tokens keeps at `stage`: a count keeps min(keep, n), a
  percentage applies to n itself."""
  spec = stage.percent or stage.keep
  return keep_count(spec, n) if isinstance(spec, str) else min(spec, n)


def _per_example(stage: Stage, n_B):
  """Each example's kept visual tokens (`keep_for`)."""
  return [keep_for(stage, int(n)) for n in n_B]


def for_example(schedule: Schedule, n_visual: int, num_layers: int) -> Schedule:
  """The schedule as one example with n_visual tokens runs it inside a batch (its count keeps
  clipped to its own tokens), resolved for it alone."""
  if isinstance(schedule, str):
    schedule = parse(schedule)
  out, n = [], n_visual
  for st in schedule:
    k, spec = keep_for(st, n), st.percent or st.keep
    keep = spec if isinstance(spec, str) else k
    out.append(_resolve_stage(dataclasses.replace(st, keep=keep, percent=None, out_len=None),
                              n, num_layers))
    n = k
  return tuple(out)


def resolve(schedule: Schedule, n_visual, num_layers: int, seq_len: int | None = None) -> Schedule:
  """Checks a schedule against a model and an input; returns it with integer keep counts.

  n_visual: visual tokens at the LLM input, one int for every example, or one per example (a
  ragged batch: the capacity is their maximum). seq_len: the input's padded length; with it
  each stage's `out_len` is the longest example leaving it (needed when the counts differ).
  """
  if isinstance(schedule, str):
    schedule = parse(schedule)
  _check_order(schedule)
  n_B = [int(n) for n in np.atleast_1d(n_visual)]
  if seq_len is None and len(set(n_B)) > 1:
    raise InputError(f"examples hold different visual-token counts {n_B}: give seq_len too")
  out, cap, length = [], max(n_B, default=0), seq_len
  for stage in schedule:
    st = _resolve_stage(stage, cap, num_layers)
    k_B = _per_example(st, n_B)
    if length is not None:   # every non-visual slot stays; each example drops n_b - k_b
      length = max(length - n + k for n, k in zip(n_B, k_B))
      st = dataclasses.replace(st, out_len=length)
    out.append(st)
    cap, n_B = st.keep, k_B
  return tuple(out)


def from_budget(method: str, layer: int, budget: float, n_visual: int, num_layers: int,
                positions: str | None = None) -> Schedule:
  """One stage whose layer-averaged visual-token count is `budget` (pruning.md §3.2).

  k = floor((L * budget - K * N_v) / (L - K)); while k < 0, K decreases (not below the method's
  minimum layer). Exact rational arithmetic, so 4992/30 floors to 166 without float surprises.
  """
  _check_method(method, f"{method}@{layer}")
  b = fractions.Fraction(str(budget))
  if not 0 <= b <= n_visual:
    raise InputError(f"budget {budget} must be in [0, {n_visual}] visual tokens")
  L = num_layers
  if not min_layer(method) <= layer < L:
    raise InputError(f"{method}@{layer}: layer must be in [{min_layer(method)}, {L - 1}]")
  for K in range(layer, min_layer(method) - 1, -1):
    k = math.floor((L * b - K * n_visual) / (L - K))
    if k >= 0:
      stage = Stage(method, K, k, positions or DEFAULT_POSITIONS[method])
      return resolve((stage,), n_visual, num_layers)
  raise InputError(f"budget {budget} is unreachable with {method}: even at layer "
                   f"{min_layer(method)} the first layers alone average more visual tokens")


def late_layer(num_layers: int, share: float = 0.625) -> int:
  """The reference's late random stage, round(share L) half up, kept in [1, L-1] (§10.6)."""
  return min(max(math.floor(share * num_layers + 0.5), 1), num_layers - 1)


def solve_keep(template: str, target: float, n_visual: int, num_layers: int, cost=None,
               positions: str | None = None) -> Schedule:
  """The schedule `template` with its one free keep ("?") solved for a budget; resolved.

  Any stage shape: "entropy@2:?", "divprune@0:?,random@20:38", "divprune@0:?,random@20:13%"
  (a later keep relative to what enters its stage). The free keep is the largest k whose cost is
  at most `target`. The default cost is the layer-averaged visual-token count, which makes this
  pruning.md §3.2's k = floor((L·avg - K·N) / (L - K)) for one stage (166 / 98 / 29 for
  EntropyPrune at 192 / 128 / 64 on LLaVA-1.5) and gives the released two-stage schedules
  (284 for "divprune@0:?,random@20:38" at 192). `cost(resolved schedule)` may be any measure
  that does not decrease with k, e.g. a FLOPs fraction.
  """
  if not isinstance(template, str) or template.count("?") != 1:
    raise InputError(f"schedule template {template!r} must hold exactly one free keep '?'")
  cost = cost or (lambda sched: average_visual(sched, num_layers))

  def at(k):
    return resolve(parse(template.replace("?", str(k)), positions), n_visual, num_layers)

  at(n_visual)   # the template itself (methods, layers, later keeps) is checked here, by name
  best = None
  for k in range(1, n_visual + 1):
    try:
      sched = at(k)
    except InputError:   # a later stage keeps more than these k: k is too small for it
      continue
    if cost(sched) > target + 1e-9:
      break
    best = sched
  if best is None:
    raise InputError(f"budget {target} is unreachable with {template!r}: its smallest keep "
                     "already costs more")
  return best


def needs(schedule: Schedule) -> frozenset:
  """What the stages need from layer K-1 (a subset of {"queries", "attn_row"})."""
  return frozenset().union(*(METHODS[s.method].NEEDS for s in schedule))


def average_visual(schedule: Schedule, num_layers: int) -> float:
  """Layer-averaged visual-token count (1/L) Σ_l N_vis(l) of a resolved schedule."""
  counts = visual_per_layer(schedule, num_layers)
  return sum(counts) / num_layers


def visual_per_layer(schedule: Schedule, num_layers: int, n_visual: int | None = None) -> list[int]:
  """N_vis(l) for l = 0..L-1 of a resolved schedule (n_visual defaults to the first stage's input)."""
  n = n_visual if n_visual is not None else (schedule[0].visual_in if schedule else 0)
  counts, stages = [], list(schedule)
  for l in range(num_layers):
    while stages and stages[0].layer == l:
      n = stages.pop(0).keep
    counts.append(n)
  return counts
