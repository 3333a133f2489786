"""Visual-token pruning: token state, schedules, methods, selection (pruning.md, architecture.md §3).

  state     TokenState, the per-batch token state between decoder segments
  schedule  Stage / parse / resolve / from_budget / needs: the `METHOD@LAYER:KEEP[,...]` schedules
  select    prune / apply_stage / kept_indices: score per example, keep the top-k, gather
  entropy, random, divprune, fastv: the methods; each has NEEDS and score(state_1, aux_1, key, k)
"""
from jaxmm.pruning.schedule import Schedule, Stage, from_budget, needs, parse, resolve
from jaxmm.pruning.select import apply_stage, kept_indices, prune
from jaxmm.pruning.state import TokenState

__all__ = ["TokenState", "Stage", "Schedule", "parse", "resolve", "from_budget", "needs", "prune",
           "apply_stage", "kept_indices"]
