"""Derive a pruning schedule from the model's own Entropy Collapse Layer and information horizon.

  jaxmm calibrate --model M --questions Q.jsonl --image-folder DIR [--answer-key KEY]
                  --budget 64|25% [--method entropy|fastv|divprune] --out schedule.json

On a calibration question set it measures the ECL curve (`analyze ecl`) and the information
horizon per question category (`analyze horizon`; the first answer token comes from the answer
key, or else from the model's own greedy answer), then chooses:
  - the scored stage: EntropyPrune and FastV at the ECL layer (where the entropy drops most, so
    tokens are ranked by the layer-(K-1) queries just before the collapse), DivPrune at the
    input (layer 0, as in its reference);
  - random pruning from the latest category's horizon on (beyond it a lone window no longer
    moves any category's answer, so which tokens stay matters no more than chance), keeping
    13% of the tokens that enter it (pruning.md §10.6); no random stage when a category never
    reaches its horizon, or when none falls after the scored stage;
  - the scored stage's keep solved so that the layer-averaged visual-token count meets the
    budget (`schedule.solve_keep`, the largest keep at most the budget).
The file holds the schedule text (accepted wherever a schedule is, as `--schedule @FILE`), the
measurements behind it and the rule that picked each layer. The ECL and horizon rules are
jaxmm's own (see their `definitions`). Deterministic for a given model, data and seed.
"""
import argparse
import sys

from jaxmm import checkpoint, sharding
from jaxmm.data import vqa
from jaxmm.errors import InputError
from jaxmm.eval import analyze_common as common
from jaxmm.eval import analyze_ecl, analyze_horizon
from jaxmm.eval import vqa as eval_vqa
from jaxmm.pruning import schedule as schedule_lib

RANDOM_SHARE = "13%"   # the later random stage keeps this share of what enters it (§10.6)
SCORED = ("entropy", "fastv", "divprune")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="jaxmm vision-language model folder")
  p.add_argument("--questions", required=True, help="LLaVA-format calibration question JSONL")
  p.add_argument("--image-folder", required=True, help="folder the `image` fields are relative to")
  p.add_argument("--out", required=True, help="the schedule JSON to write")
  p.add_argument("--limit", type=int, help="use only the first N questions")
  sharding.add_args(p)
  p.add_argument("--answer-key", help="JSONL of {question_id, answer[, category]}; without it "
                 "the horizon follows the model's own greedy answers")
  p.add_argument("--budget", required=True, help="layer-averaged visual tokens: a count (64) or "
                 "a share of each prompt's visual tokens (25%%)")
  p.add_argument("--method", default="entropy", choices=SCORED)
  p.add_argument("--tau", type=float, default=0.05, help="the horizon threshold (jaxmm's own)")
  p.add_argument("--horizon-limit", type=int, default=32,
                 help="questions probed for the horizon (the slow measurement; default 32)")


def visual_count(m, rows, pr, image_folder) -> int:
  """The calibration set's one visual-token count per prompt."""
  from jaxmm.eval import analyze_crossover
  counts = list(analyze_crossover.visual_counts(m, rows, pr, image_folder).values())
  if not counts or max(counts) == 0:
    raise InputError("the calibration questions hold no visual tokens")
  if len(set(counts)) > 1:
    raise InputError(f"calibration prompts hold different visual-token counts {sorted(set(counts))}"
                     "; calibrate a model whose images give one count")
  return counts[0]


def parse_budget(text: str) -> tuple[float, bool]:
  """(value, is a percentage) of --budget, checked before any measurement."""
  try:
    value = float(text[:-1] if text.endswith("%") else text)
  except ValueError:
    raise InputError(f"--budget {text!r} is neither a count nor a percentage") from None
  pct = text.endswith("%")
  if not 0 < value <= (100 if pct else float("inf")):
    raise InputError(f"--budget {text} must be above 0" + (" and at most 100%" if pct else ""))
  return value, pct


def budget_tokens(text: str, n_visual: int) -> float:
  """--budget as a layer-averaged token count."""
  value, pct = parse_budget(text)
  value = value / 100 * n_visual if pct else value
  if value > n_visual:
    raise InputError(f"--budget {text} exceeds the {n_visual} visual tokens per prompt")
  return value


def own_answers(m, rows, image_folder) -> dict:
  """{question_id: {"answer", "category"}} from the model's greedy answers (no key given)."""
  lines, _, _ = eval_vqa.answer_all(m, rows, image_folder, max_new_tokens=4, progress=False)
  cats = {r["question_id"]: r.get("category") for r in rows}
  return {l["question_id"]: {"answer": l["text"] or " ", "category": cats[l["question_id"]]}
          for l in lines}


def choose(method: str, ecl_layer: int, horizons: dict) -> tuple[str, list]:
  """(schedule template with one free keep, [choice records]) from the measured layers."""
  if method == "divprune":
    k, rule, why = 0, "reference", "DivPrune scores the projector outputs: layer 0, as its reference"
  else:
    k, rule = max(ecl_layer, schedule_lib.min_layer(method)), "ecl"
    why = (f"the Entropy Collapse Layer {ecl_layer} (largest drop of the mean token-wise "
           f"entropy); tokens are ranked by layer-{k - 1} quantities just before it")
  choices = [{"stage": method, "layer": k, "rule": rule, "reason": why}]
  never = sorted(c for c, h in horizons.items() if h is None)
  latest = None if never else max(horizons.values(), default=None)
  if latest is None or latest <= k:
    why = (f"categories {never} never reach their horizon" if never else
           f"no category horizon falls after layer {k} ({horizons})")
    choices.append({"stage": "random", "layer": None, "rule": "horizon",
                    "reason": why + ": no random stage"})
    return f"{method}@{k}:?", choices
  choices.append({"stage": "random", "layer": latest, "rule": "horizon",
                  "reason": f"the latest category horizon ({horizons}): beyond it a lone 2x2 "
                            f"window no longer moves any category's answer; keeps "
                            f"{RANDOM_SHARE} of the tokens entering it"})
  return f"{method}@{k}:?,random@{latest}:{RANDOM_SHARE}", choices


def calibrate(args) -> dict:
  parse_budget(args.budget)
  m, rows, pr = common.load(args)
  n_visual = visual_count(m, rows, pr, args.image_folder)
  target = budget_tokens(args.budget, n_visual)
  if args.answer_key:
    key = vqa.read_answer_key(args.answer_key)
    missing = [r["question_id"] for r in rows if r["question_id"] not in key]
    if missing:
      raise InputError(f"answer key {args.answer_key} has no answer for question(s) "
                       f"{missing[:5]}")
  else:
    key = own_answers(m, rows, args.image_folder)
  ecl = analyze_ecl.analyze(m, rows, pr, args.image_folder)
  probe = [r for r in rows if r["question_id"] in key][:args.horizon_limit]
  hz = analyze_horizon.analyze(m, probe, pr, args.image_folder, key, args.tau)
  horizons = {c: s["horizon"] for c, s in hz["categories"].items()}
  n_l = m.config.text.num_layers
  template, choices = choose(args.method, ecl["ecl_layer"], horizons)
  sched = schedule_lib.solve_keep(template, target, n_visual, n_l)
  text = ",".join(f"{s.method}@{s.layer}:{s.keep}" for s in sched)
  return {"schedule": text, "template": template, "budget": args.budget,
          "budget_tokens": target, "visual_tokens": n_visual, "num_layers": n_l,
          "average_visual": schedule_lib.average_visual(sched, n_l), "method": args.method,
          "choices": choices, "model": str(m.path), "questions": len(rows),
          "answers": "answer key" if args.answer_key else "the model's own greedy answers",
          "measurements": {
              "ecl": {k: ecl[k] for k in ("ecl_layer", "mean_token_entropy", "drops", "rule",
                                          "ecl_layer_trace_normalised")},
              "horizon": {"tau": args.tau, "questions": len(probe), "layers": hz["layers"],
                          "per_category": {c: {"horizon": s["horizon"],
                                               "mean_abs": s["mean_abs"]}
                                           for c, s in hz["categories"].items()}}},
          "definitions": {**analyze_ecl.DEFINITIONS, **analyze_horizon.DEFINITIONS}}


def run(args) -> int:
  res = calibrate(args)
  checkpoint.write_json(args.out, res)
  print(f"schedule: {res['schedule']}  (average {res['average_visual']:.2f} of "
        f"{res['visual_tokens']} visual tokens; budget {res['budget_tokens']:.2f})")
  for c in res["choices"]:
    print(f"  {c['stage']} at layer {c['layer']}: {c['reason']}")
  print(f"wrote {args.out}; use it as --schedule @{args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from jaxmm.cli import module_main
  raise SystemExit(module_main(__name__))
