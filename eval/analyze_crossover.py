"""Where a pruning method stops beating random: accuracy against the pruning layer.

  jaxmm analyze crossover --model M --questions Q.jsonl --image-folder DIR --answer-key KEY
                          --out DIR [--method entropy] [--keep 22%] [--layers 1-7]
                          [--random-seeds 3] [--limit N] [--batch-size 50]
                          [--max-new-tokens 8]

M is any vision-language family; a count KEEP keeps min(KEEP, n) of a question's n visual
tokens, a percentage applies to each question's own n. For every swept layer K it answers the
questions twice over: with `METHOD@K:KEEP` and with `random@K:KEEP`, the random stage placing
its survivors like the method's stage does (same `positions`, the method's own or --positions)
and drawn with several seeds. The advantage of the method at K is its accuracy minus the mean
random accuracy; its standard error combines the method's binomial error with the spread of
the random draws. The crossover layer is the first swept K from which on the
advantage never exceeds twice that error: beyond it, the method is no better than random
(pruning.md §4: random pruning at and beyond the information horizon). `null` when the method
keeps a clear advantage to the last swept layer.

Writes OUT/crossover.json and OUT/crossover.png (overall and per-category accuracy vs layer).
"""
import argparse
from pathlib import Path

import numpy as np

import jaxmm.cli
from jaxmm.eval import analyze_common as common
from jaxmm.eval import vqa as eval_vqa
from jaxmm import checkpoint
from jaxmm.data import vqa
from jaxmm.errors import InputError
from jaxmm.models import core
from jaxmm.pruning import schedule as schedule_lib

METHODS = ("entropy", "fastv", "divprune")


def add_args(p: argparse.ArgumentParser) -> None:
  common.add_common_args(p)
  p.add_argument("--answer-key", required=True, help="answer key JSONL (question_id, answer)")
  p.add_argument("--method", choices=METHODS, default="entropy", help="the method against random")
  p.add_argument("--keep", default="22%", help="visual tokens kept: a count or a percentage")
  p.add_argument("--layers", help="layers to sweep: 'A-B', 'A,B,C' or a mix (default: every "
                 "layer the method can prune at)")
  p.add_argument("--positions", choices=schedule_lib.POSITIONS,
                 help="position ids of the kept tokens, for the method and random alike "
                 "(default: the method's own; M-RoPE models need preserve)")
  p.add_argument("--random-seeds", type=int, default=3, help="random draws per layer")
  p.add_argument("--batch-size", type=int, default=50)
  p.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (the demo's "
                 "one-word answers need 2)")


def crossover_layer(layers, acc_method, acc_random_RxK, n: int):
  """First layer from which the method's advantage over random stays within 2 standard errors.

  acc_method f[K], acc_random_RxK f[R, K] (fractions), n questions scored. Returns
  (layer or None, advantage f[K], standard error f[K]).
  """
  m, r = np.asarray(acc_method, float), np.asarray(acc_random_RxK, float)
  r_mean = r.mean(0)
  # Spread of the random mean: across draws when there are several, else binomial.
  r_var = r.var(0, ddof=1) / len(r) if len(r) > 1 else r_mean * (1 - r_mean) / n
  se = np.sqrt(m * (1 - m) / n + r_var)
  adv = m - r_mean
  clear = np.flatnonzero(adv > 2 * se)          # layers where the method is clearly ahead
  first = clear[-1] + 1 if clear.size else 0
  return (layers[first] if first < len(layers) else None), adv, se


def sweep(m, rows, key, image_folder, method, keep, layers, seeds, batch,
          max_new_tokens, positions=None) -> list[dict]:
  """Per layer, the scores (`jaxmm.eval.vqa.score`) of the method and of each random draw
  (`positions`: both stages' position convention; None: the method's own)."""
  def scores(text, positions, seed):
    lines, _, _ = eval_vqa.answer_all(m, rows, image_folder,
                                      schedule_lib.parse(text, positions=positions), batch,
                                      max_new_tokens, progress=False, seed=seed)
    return eval_vqa.score(lines, rows, key)
  out = []
  for k in layers:
    stage = f"{method}@{k}:{keep}"
    positions = schedule_lib.parse(stage, positions)[0].positions
    res = scores(stage, positions, 0)
    rnd = [scores(f"random@{k}:{keep}", positions, s) for s in range(seeds)]
    out.append({"layer": k, "method": res, "random": rnd})
    print(f"  layer {k}: {method} {100 * res['overall']:.1f}%  random "
          f"{100 * np.mean([x['overall'] for x in rnd]):.1f}%", flush=True)
  return out


def curves(sw: list[dict], layers) -> dict:
  """Per category (and "overall"): accuracies, random mean and spread, advantage, standard
  error and crossover layer, each category with its own number of scored questions."""
  first = sw[0]["method"]
  out = {}
  for c in ["overall", *first["per_category"]]:
    get = (lambda res: res["overall"]) if c == "overall" else (lambda res: res["per_category"][c])
    n = sum(first["counts"].values()) if c == "overall" else first["counts"][c]
    a_m = [get(r["method"]) for r in sw]
    a_r = np.array([[get(x) for x in r["random"]] for r in sw]).T
    cross, adv, se = crossover_layer(layers, a_m, a_r, n)
    out[c] = {"questions": n, "method": a_m, "random_mean": a_r.mean(0).tolist(),
              "random_std": a_r.std(0).tolist(), "advantage": adv.tolist(),
              "standard_error": se.tolist(), "crossover_layer": cross}
  return out


def visual_counts(m, rows, pr, image_folder) -> dict:
  """{question_id: visual tokens} of the readable questions, as the model's family counts them
  (`core.prepare`: each image's own count)."""
  out = {}
  for r, inputs in common.questions(rows, pr, image_folder, "visual tokens"):
    out[r["question_id"]] = int(core.prepare(m.family, m.config, inputs).visual_B[0])
  return out


def check_keep(text: str, counts) -> int | str:
  """The keep of `--keep` (a count, or a percentage string that each question applies to its
  own visual tokens), checked to keep at least one token of every question and, as a count, at
  most the largest visual block."""
  keep = schedule_lib.parse(f"random@1:{text}")[0].keep
  if not counts:
    raise InputError("no readable question")
  low = min(schedule_lib.keep_count(keep, n) for n in counts)
  if low < 1 or (isinstance(keep, int) and keep > max(counts)):
    raise InputError(f"--keep {text}: keeps {low if low < 1 else keep} of the questions' "
                     f"{min(counts)}..{max(counts)} visual tokens; it must keep between 1 and "
                     "all of them")
  return keep


def analyze(args) -> dict:
  if args.random_seeds < 1:
    raise InputError(f"--random-seeds must be >= 1, got {args.random_seeds}")
  m, rows, pr = common.load(args)
  n_l = m.config.text.num_layers
  layers = common.parse_layers(args.layers, schedule_lib.min_layer(args.method), n_l)
  counts = visual_counts(m, rows, pr, args.image_folder)
  keep = check_keep(args.keep, list(counts.values()))
  sw = sweep(m, rows, vqa.read_answer_key(args.answer_key), args.image_folder, args.method, keep,
             layers, args.random_seeds, args.batch_size, args.max_new_tokens, args.positions)
  cv = curves(sw, layers)
  return {"model": str(m.path), "method": args.method, "keep": keep,
          "positions": args.positions or schedule_lib.DEFAULT_POSITIONS[args.method],
          "visual_tokens": max(counts.values()),
          "visual_tokens_per_question": [{"question_id": q, "visual_tokens": n}
                                         for q, n in counts.items()],
          "num_layers": n_l, "layers": layers, "random_seeds": args.random_seeds,
          "questions_scored": cv["overall"]["questions"],
          "crossover_layer": cv["overall"]["crossover_layer"], "curves": cv,
          "rule": "first swept layer from which (method - mean random) <= 2 standard errors "
                  "at every later swept layer", "raw": sw}


def plot(res: dict, path: Path) -> None:
  plt = common.pyplot()
  names = list(res["curves"])
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True)
  for ax, name in zip(np.atleast_1d(axes), names):
    c, x = res["curves"][name], res["layers"]
    ax.plot(x, 100 * np.array(c["method"]), "o-", label=res["method"])
    lo = 100 * (np.array(c["random_mean"]) - np.array(c["random_std"]))
    hi = 100 * (np.array(c["random_mean"]) + np.array(c["random_std"]))
    ax.plot(x, 100 * np.array(c["random_mean"]), "s--", label=f"random (±1 sd, "
            f"{res['random_seeds']} draws)")
    ax.fill_between(x, lo, hi, alpha=0.2, color="C1")
    if c["crossover_layer"] is not None:
      ax.axvline(c["crossover_layer"], color="red", ls=":", label=f"crossover {c['crossover_layer']}")
    ax.set_title(name)
    ax.set_xlabel("pruning layer K")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel(f"accuracy (%), keep {res['keep']} of {res['visual_tokens']}"
                                    if isinstance(res["keep"], int) else
                                    f"accuracy (%), keep {res['keep']} of each")
  np.atleast_1d(axes)[0].legend(fontsize=7)
  fig.suptitle(f"{common.model_name(res['model'])}: {res['method']} vs random, "
               f"{res['questions_scored']} questions", fontsize=9)
  fig.tight_layout()
  checkpoint.atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
  plt.close(fig)


def run(args) -> int:
  res = analyze(args)
  out = Path(args.out)
  checkpoint.write_json(out / "crossover.json", res, indent=1)
  plot(res, out / "crossover.png")
  ov = res["curves"]["overall"]
  print(f"{'layer':>5} {res['method']:>9} {'random':>9} {'adv':>7} {'2se':>6}")
  for i, k in enumerate(res["layers"]):
    print(f"{k:>5} {100 * ov['method'][i]:>8.1f}% {100 * ov['random_mean'][i]:>8.1f}% "
          f"{100 * ov['advantage'][i]:>+6.1f} {200 * ov['standard_error'][i]:>6.1f}")
  cl = res["crossover_layer"]
  print(f"crossover layer: {cl if cl is not None else 'none (the method stays ahead)'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
