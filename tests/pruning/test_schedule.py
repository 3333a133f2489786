"""Schedule text form, resolution against a model/input, and the §3.2 budget conversion."""
import pytest

from jaxmm import config as config_lib, flops
from jaxmm.errors import InputError
from jaxmm.pruning import schedule
from jaxmm.pruning.schedule import Stage


def test_parse_single_and_multi_stage():
  assert schedule.parse("entropy@2:98") == (Stage("entropy", 2, 98, "preserve"),)
  assert schedule.parse("divprune@0:284, random@20:38") == (
      Stage("divprune", 0, 284, "compact"), Stage("random", 20, 38, "compact"))
  assert schedule.parse("fastv@2:50%") == (Stage("fastv", 2, "50%", "preserve"),)
  assert schedule.parse("FastV@3:12.5%")[0].keep == "12.5%"


def test_parse_positions_override_and_hashable():
  s = schedule.parse("entropy@2:98,random@20:10", positions="compact")
  assert {st.positions for st in s} == {"compact"}
  assert hash(s) == hash(schedule.parse("entropy@2:98,random@20:10", "compact"))


@pytest.mark.parametrize("text, names", [
    ("", "empty"), ("   ", "empty"), ("entropy@2", "'entropy@2'"), ("entropy:98", "'entropy:98'"),
    ("entropy@2:98,", "empty stage"), ("entrop@2:98", "'entrop'"), ("entropy@0:98", "layer must be >= 1"),
    ("fastv@0:50%", "layer must be >= 1"), ("random@-1:5", "'random@-1:5'"),
    ("random@1:-5", "count >= 0"), ("random@1:2.5", "count >= 0"), ("random@1:150%", "150%"),
    ("random@3:5,random@3:2", "strictly increasing"), ("random@5:5,divprune@1:2", "strictly increasing"),
    ("random@1:x", "malformed")])
def test_parse_rejects_bad_text_naming_the_part(text, names):
  with pytest.raises(InputError, match=names.replace("(", r"\(")):
    schedule.parse(text)


def test_parse_rejects_unknown_positions():
  with pytest.raises(InputError, match="positions"):
    schedule.parse("random@1:5", positions="shift")


def test_resolve_percentages_and_chain():
  s = schedule.resolve(schedule.parse("divprune@0:50%,random@4:25%"), 576, 32)
  assert [(st.keep, st.visual_in) for st in s] == [(288, 576), (72, 288)]
  assert schedule.resolve(schedule.parse("fastv@2:12.5%"), 576, 32)[0].keep == 72
  assert schedule.resolve(schedule.parse("random@1:0.1%"), 500, 32)[0].keep == 1   # 0.5 rounds up


@pytest.mark.parametrize("text, names", [
    ("entropy@2:600", "entropy@2:600"), ("divprune@0:100,random@20:101", "random@20:101"),
    ("random@32:5", "layer must be in"), ("entropy@40:5", "entropy@40:5")])
def test_resolve_rejects_naming_the_stage(text, names):
  with pytest.raises(InputError, match=names):
    schedule.resolve(schedule.parse(text), 576, 32)


def test_resolve_rejects_programmatic_errors():
  with pytest.raises(InputError, match="layer must be in"):
    schedule.resolve((Stage("entropy", 0, 5),), 576, 32)
  with pytest.raises(InputError, match="strictly increasing"):
    schedule.resolve((Stage("random", 5, 5), Stage("random", 2, 1)), 576, 32)
  with pytest.raises(InputError, match="unknown method"):
    schedule.resolve((Stage("vtw", 5, 0),), 576, 32)


@pytest.mark.parametrize("budget, keep", [(192, 166), (128, 98), (64, 29)])
def test_budget_llava15(budget, keep):
  (st,) = schedule.from_budget("entropy", 2, budget, 576, 32)
  assert (st.layer, st.keep, st.positions, st.visual_in) == (2, keep, "preserve", 576)
  assert schedule.average_visual((st,), 32) <= budget


def test_budget_lowers_the_layer_when_negative():
  # K=2: (32*20 - 2*576)/30 < 0; K=1: (640 - 576)/31 = 2.06 -> 2.
  (st,) = schedule.from_budget("fastv", 2, 20, 576, 32)
  assert (st.layer, st.keep) == (1, 2)
  # random may go down to layer 0: k = budget.
  (st,) = schedule.from_budget("random", 2, 5, 576, 32)
  assert (st.layer, st.keep) == (0, 5)
  with pytest.raises(InputError, match="unreachable"):
    schedule.from_budget("entropy", 2, 5, 576, 32)
  with pytest.raises(InputError, match="budget"):
    schedule.from_budget("entropy", 2, 600, 576, 32)


def test_needs_and_visual_per_layer():
  s = schedule.resolve(schedule.parse("divprune@0:284,random@20:38"), 576, 32)
  assert schedule.needs(s) == frozenset()
  assert schedule.needs(schedule.parse("entropy@2:5,fastv@4:2")) == {"queries", "attn_row"}
  counts = schedule.visual_per_layer(s, 32)
  assert counts == [284] * 20 + [38] * 12
  assert schedule.average_visual(s, 32) == pytest.approx(191.75)   # pruning.md §4.2 table


def test_entropy_layer_per_model_follows_the_reference():
  """pruning.md §3.2: K = 2 for LLaVA-1.5 / LLaVA-1.6, K = 1 for Qwen2.5-VL."""
  from jaxmm import config
  assert schedule.entropy_layer(config.qwen25_vl_7b().model_type) == 1
  assert schedule.entropy_layer("llava") == schedule.entropy_layer("llava_next") == 2


# ---- budget algebra: one free keep in any stage shape --------------------------------------------

@pytest.mark.parametrize("template,target,want", [
    ("entropy@2:?", 192, (166,)), ("entropy@2:?", 128, (98,)), ("entropy@2:?", 64, (29,)),
    ("divprune@0:?,random@20:38", 192, (284, 38)),      # pruning.md §4.2, the released scripts
    ("divprune@0:?,random@20:10", 64, (96, 10)),
    ("divprune@2:?,random@20:38", 192, (252, 38)),      # DART+Random "192" (its stage shape)
    ("divprune@1:?,random@20:27", 64, (60, 27)),        # DART+Random "64"
])
def test_solve_keep_gives_the_reference_keeps(template, target, want):
  sched = schedule.solve_keep(template, target, 576, 32)
  assert tuple(s.keep for s in sched) == want
  # the largest such keep: one more exceeds the target
  avg = schedule.average_visual(sched, 32)
  assert avg <= target
  bigger = template.replace("?", str(sched[0].keep + 1))
  assert schedule.average_visual(schedule.resolve(schedule.parse(bigger), 576, 32), 32) > target


def test_solve_keep_equals_from_budget_for_one_stage():
  for budget in (64.5, 100, 300):   # reachable at K=3 (from_budget would lower K otherwise)
    got = schedule.solve_keep("fastv@3:?", budget, 576, 32)
    assert got == schedule.from_budget("fastv", 3, budget, 576, 32)


def test_solve_keep_with_a_relative_later_stage_and_a_flops_cost():
  sched = schedule.solve_keep("divprune@0:?,random@20:13%", 192, 576, 32)
  k1, k2 = (s.keep for s in sched)
  assert k2 == schedule.keep_count("13%", k1) and schedule.average_visual(sched, 32) <= 192
  dims = flops.Dims.from_config(config_lib.llava15_7b())
  frac = lambda s: 1 - flops.batch_reduction(s, [40], [576], dims, "B")
  half = schedule.solve_keep("entropy@2:?", 0.5, 576, 32, cost=frac)
  assert frac(half) <= 0.5 < frac(schedule.resolve(schedule.parse(
      f"entropy@2:{half[0].keep + 1}"), 576, 32))


@pytest.mark.parametrize("template,target,needle", [
    ("entropy@2:50", 64, "exactly one free keep"),
    ("entropy@2:?,random@20:?", 64, "exactly one free keep"),
    ("entropy@40:?", 64, "layer"),
    ("entropy@30:?", 10, "unreachable"),
])
def test_solve_keep_errors(template, target, needle):
  with pytest.raises(InputError, match=needle):
    schedule.solve_keep(template, target, 576, 32)


def test_late_layer_rounds_half_up_inside_the_decoder():
  # LLaVA-1.5's 32 layers: 20 (the reference's random@20); 8 -> 5; 4 -> 2.5 rounds up to 3
  assert [schedule.late_layer(n) for n in (32, 30, 8, 4, 2)] == [20, 19, 5, 3, 1]
