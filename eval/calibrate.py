"""Derive a pruning schedule from the model's own Entropy Collapse Layer and information horizon.

  jaxmm calibrate --model M --questions Q.jsonl --image-folder DIR [--answer-key KEY]
                  --budget 64|25% [--method entropy|fastv|divprune|auto] [--no-search]
                  --out schedule.json

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
    budget (`schedule.solve_keep`, the largest keep at most the budget); when the layers before
    the ECL alone average more than the budget, the scored stage moves to the latest earlier
    layer that can meet it (as `schedule.from_budget` moves K), and the output says so.
With an answer key (unless --no-search), those layers are the first of a few candidates built
from the same measurements (the scored stage at ECL-1 / ECL / ECL+1, the random stage at none,
each category's horizon, the pooled horizon or the reference's round(0.625 L)); each is solved
for the budget and answers the calibration questions, and the most accurate wins (ties: the
rule's own). The file lists every candidate with its calibration accuracy ("search").
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
  p.add_argument("--method", default="entropy", choices=SCORED + ("auto",),
                 help="the scored method; auto: the best of them on the calibration questions "
                 "(needs --answer-key)")
  p.add_argument("--tau", type=float, default=0.05, help="the horizon threshold (jaxmm's own)")
  p.add_argument("--horizon-limit", type=int, default=32,
                 help="questions probed for the horizon (the slow measurement; default 32)")
  p.add_argument("--no-search", action="store_true",
                 help="with an answer key: keep the rule's layers instead of picking among the "
                 "measurement-derived candidates by calibration accuracy")


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


def template(method: str, layer: int, late: int | None) -> str:
  """The schedule shape with its one free keep: the scored stage, then random at `late`."""
  return f"{method}@{layer}:?" + ("" if late is None else f",random@{late}:{RANDOM_SHARE}")


def categories(horizons: dict) -> dict:
  """The per-category horizons; the pooled "all" entry only when the questions have no
  categories (then it is the one category)."""
  own = {c: h for c, h in horizons.items() if c != "all"}
  return own or horizons


def choose(method: str, ecl_layer: int, horizons: dict) -> tuple[str, list]:
  """(schedule template with one free keep, [choice records]) from the measured layers."""
  if method == "divprune":
    k, rule, why = 0, "reference", "DivPrune scores the projector outputs: layer 0, as its reference"
  else:
    k, rule = max(ecl_layer, schedule_lib.min_layer(method)), "ecl"
    why = (f"the Entropy Collapse Layer {ecl_layer} (largest drop of the mean token-wise "
           f"entropy); tokens are ranked by layer-{k - 1} quantities just before it")
  choices = [{"stage": method, "layer": k, "rule": rule, "reason": why}]
  horizons = categories(horizons)
  never = sorted(c for c, h in horizons.items() if h is None)
  latest = None if never else max(horizons.values(), default=None)
  if latest is None or latest <= k:
    why = (f"categories {never} never reach their horizon" if never else
           f"no category horizon falls after layer {k} ({horizons})")
    choices.append({"stage": "random", "layer": None, "rule": "horizon",
                    "reason": why + ": no random stage"})
    return template(method, k, None), choices
  choices.append({"stage": "random", "layer": latest, "rule": "horizon",
                  "reason": f"the latest category horizon ({horizons}): beyond it a lone 2x2 "
                            f"window no longer moves any category's answer; keeps "
                            f"{RANDOM_SHARE} of the tokens entering it"})
  return template(method, k, latest), choices


def solve(method: str, choices: list, target: float, n_visual: int, n_l: int):
  """The schedule meeting `target`: the chosen layers, or, when the scored stage's first layers
  alone average more than the budget, that stage moved to the latest earlier layer that can meet
  it (the reason is added to its choice record). Raises InputError when no layer can."""
  k, late = choices[0]["layer"], choices[1]["layer"]
  error = None
  for layer in range(k, schedule_lib.min_layer(method) - 1, -1):
    try:
      sched = schedule_lib.solve_keep(template(method, layer, late), target, n_visual, n_l)
    except InputError as e:
      error = error or e
      continue
    if layer != k:
      choices[0] = {**choices[0], "layer": layer, "rule": choices[0]["rule"] + "+budget",
                    "reason": choices[0]["reason"] + f"; moved to layer {layer} (ranked by "
                    f"layer-{layer - 1} quantities): from layer {k} the first layers alone "
                    f"average more than the budget {target:g}"}
    return sched
  raise error


def measure(m, rows, pr, image_folder, key: dict | None, tau: float = 0.05,
            horizon_limit: int = 32) -> dict:
  """The model's ECL curve and per-category horizons on calibration questions (no budget yet).

  `key`: {question_id: {"answer", "category"}}, or None for the model's own greedy answers.
  """
  n_visual = visual_count(m, rows, pr, image_folder)
  if key is None:
    key, source = own_answers(m, rows, image_folder), "the model's own greedy answers"
  else:
    missing = [r["question_id"] for r in rows if r["question_id"] not in key]
    if missing:
      raise InputError(f"the answer key has no answer for question(s) {missing[:5]}")
    source = "answer key"
  ecl = analyze_ecl.analyze(m, rows, pr, image_folder)
  probe = [r for r in rows if r["question_id"] in key][:horizon_limit]
  hz = analyze_horizon.analyze(m, probe, pr, image_folder, key, tau)
  return {"model": str(m.path), "questions": len(rows), "answers": source,
          "visual_tokens": n_visual, "num_layers": m.config.text.num_layers,
          "ecl": {k: ecl[k] for k in ("ecl_layer", "mean_token_entropy", "drops", "rule",
                                      "ecl_layer_trace_normalised")},
          "horizon": {"tau": tau, "questions": len(probe), "layers": hz["layers"],
                      "per_category": {c: {"horizon": st["horizon"], "mean_abs": st["mean_abs"]}
                                       for c, st in hz["categories"].items()}}}


def plan(meas: dict, method: str, budget: str, layers=None, reason: str | None = None) -> dict:
  """The schedule for `method` at `budget` (a count or a share, --budget's form) from `measure`'s
  measurements: the layers by `choose` (or `layers` = (scored, random or None), picked by
  `search` for `reason`), the free keep by `schedule.solve_keep`."""
  n_visual, n_l = meas["visual_tokens"], meas["num_layers"]
  target = budget_tokens(budget, n_visual)
  horizons = {c: st["horizon"] for c, st in meas["horizon"]["per_category"].items()}
  _, choices = choose(method, meas["ecl"]["ecl_layer"], horizons)
  if layers is not None:
    choices = [{**choices[0], "layer": layers[0], "rule": "calibration accuracy",
                "reason": reason}, {**choices[1], "layer": layers[1],
                                    "rule": "calibration accuracy", "reason": reason}]
  sched = solve(method, choices, target, n_visual, n_l)
  shape = template(method, choices[0]["layer"], choices[1]["layer"])
  return {"schedule": schedule_text(sched), "template": shape, "budget": budget,
          "budget_tokens": target, "visual_tokens": n_visual, "num_layers": n_l,
          "average_visual": schedule_lib.average_visual(sched, n_l), "method": method,
          "choices": choices, "model": meas["model"], "questions": meas["questions"],
          "answers": meas["answers"],
          "measurements": {"ecl": meas["ecl"], "horizon": meas["horizon"]},
          "definitions": {**analyze_ecl.DEFINITIONS, **analyze_horizon.DEFINITIONS}}


def candidates(method: str, meas: dict) -> list[tuple[int, int | None, str]]:
  """(scored layer, random layer or None, where they come from) to try on the calibration set:
  the scored stage at ECL-1, the ECL and ECL+1 (DivPrune: 0); the random stage at none, each
  category's horizon and the pooled one, and the reference's round(0.625 L) (pruning.md §10.6).
  The rule's own choice (`choose`) comes first, so it wins ties."""
  n_l, ecl = meas["num_layers"], meas["ecl"]["ecl_layer"]
  lowest = schedule_lib.min_layer(method)
  scored = [0] if method == "divprune" else sorted(
      {min(max(k, lowest), n_l - 1) for k in (ecl, ecl - 1, ecl + 1)}, key=lambda k: abs(k - ecl))
  per_cat = {c: st["horizon"] for c, st in meas["horizon"]["per_category"].items()}
  lates = {None: "no random stage"}
  for c, h in sorted(per_cat.items(), key=lambda x: str(x)):
    if h is not None:
      lates.setdefault(h, f"the {c!r} horizon")
  lates.setdefault(schedule_lib.late_layer(n_l), "the reference's round(0.625 L)")
  _, rule = choose(method, ecl, per_cat)
  first = (rule[0]["layer"], rule[1]["layer"])
  out = [(k, r, f"scored at layer {k}, random: {why}") for k in scored for r, why in lates.items()
         if r is None or r > k]
  out.sort(key=lambda c: (c[0], c[1]) != first)
  return out


def search(m, rows, image_folder, key: dict, meas: dict, method: str, budget: str,
           seed: int = 0, batch_size: int = 50) -> dict:
  """`plan` by calibration accuracy: every candidate's schedule, solved for the budget, answers
  the calibration questions (2 new tokens, random stages from `seed`); the most accurate wins
  (ties: the earlier candidate, the rule's own first). Returns `plan`'s record with the
  "search" table added."""
  n_visual, n_l = meas["visual_tokens"], meas["num_layers"]
  target = budget_tokens(budget, n_visual)
  tried, best, seen = [], None, {}
  for k, late, why in candidates(method, meas):
    choices = [{"layer": k, "reason": why, "rule": "candidate"}, {"layer": late}]
    try:    # as `plan` does, a stage that cannot meet the budget moves earlier
      sched = solve(method, choices, target, n_visual, n_l)
    except InputError as e:
      tried.append({"template": template(method, k, late), "reason": why, "error": str(e)})
      continue
    text = schedule_text(sched)
    if text not in seen:
      lines, _, _ = eval_vqa.answer_all(m, rows, image_folder, sched, batch_size, 2,
                                        progress=False, seed=seed)
      seen[text] = eval_vqa.score(lines, rows, key)["overall"]
    acc = seen[text]
    tried.append({"template": template(method, k, late), "reason": why, "accuracy": acc,
                  "schedule": text})
    if best is None or acc > best[0]:
      best = (acc, k, late, why)
  if best is None:
    raise InputError(f"budget {budget} is out of reach for every {method} candidate")
  res = plan(meas, method, budget, layers=best[1:3], reason=best[3])
  return {**res, "search": tried, "calibration_accuracy": best[0]}


def search_methods(m, rows, image_folder, key: dict, meas: dict, budget: str, seed: int = 0,
                   batch_size: int = 50) -> dict:
  """--method auto: `search` for each scored method; the most accurate on the calibration
  questions wins (ties: the order of SCORED). Methods out of reach at the budget are skipped."""
  best = None
  for method in SCORED:
    try:
      res = search(m, rows, image_folder, key, meas, method, budget, seed, batch_size)
    except InputError:
      continue
    if best is None or res["calibration_accuracy"] > best["calibration_accuracy"]:
      best = res
  if best is None:
    raise InputError(f"budget {budget} is out of reach for every method")
  return best


def schedule_text(sched) -> str:
  return ",".join(f"{st.method}@{st.layer}:{st.keep}" for st in sched)


def calibrate(args) -> dict:
  parse_budget(args.budget)
  m, rows, pr = common.load(args)
  key = vqa.read_answer_key(args.answer_key) if args.answer_key else None
  meas = measure(m, rows, pr, args.image_folder, key, args.tau, args.horizon_limit)
  if args.method == "auto" and (key is None or args.no_search):
    raise InputError("--method auto picks by calibration accuracy: it needs --answer-key "
                     "(and no --no-search)")
  if key is None or args.no_search:
    return plan(meas, args.method, args.budget)
  if args.method == "auto":
    return search_methods(m, rows, args.image_folder, key, meas, args.budget)
  return search(m, rows, args.image_folder, key, meas, args.method, args.budget)


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
