"""Where a pruning method stops beating random: accuracy against the pruning layer.

  jaxmm analyze crossover --model M --questions Q.jsonl --image-folder DIR --answer-key KEY
                          --out DIR [--method entropy] [--keep 22%] [--layers 1-7]
                          [--random-seeds 3] [--limit N] [--batch-size 50]
                          [--max-new-tokens 8]

For every swept layer K it answers the questions twice over: with `METHOD@K:KEEP` and with
`random@K:KEEP`, the random stage placing its survivors like the method's stage does (same
`positions`) and drawn with several seeds. The advantage of the method at K is its accuracy
minus the mean random accuracy; its standard error combines the method's binomial error with
the spread of the random draws. The crossover layer is the first swept K from which on the
advantage never exceeds twice that error: beyond it, the method is no better than random
(pruning.md §4: random pruning at and beyond the information horizon). `null` when the method
keeps a clear advantage to the last swept layer.

Writes OUT/crossover.json and OUT/crossover.png (overall and per-category accuracy vs layer).
"""
import argparse
from pathlib import Path

import numpy as np

import jaxmm.cli
from eval import analyze_common as common
from eval import vqa as eval_vqa
from jaxmm import api, checkpoint
from jaxmm.data import vqa
from jaxmm.errors import InputError
from jaxmm.pruning import schedule as schedule_lib

METHODS = ("entropy", "fastv", "divprune")


def add_args(p: argparse.ArgumentParser) -> None:
  common.add_common_args(p)
  p.add_argument("--answer-key", required=True, help="answer key JSONL (question_id, answer)")
  p.add_argument("--method", choices=METHODS, default="entropy", help="the method against random")
  p.add_argument("--keep", default="22%", help="visual tokens kept: a count or a percentage")
  p.add_argument("--layers", help="layers to sweep: 'A-B' or 'A,B,C' (default: every layer the "
                 "method can prune at)")
  p.add_argument("--random-seeds", type=int, default=3, help="random draws per layer")
  p.add_argument("--batch-size", type=int, default=50)
  p.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (the demo's "
                 "one-word answers need 2)")


def parse_layers(text: str | None, lowest: int, num_layers: int) -> list[int]:
  """'A-B' or 'A,B,...' as a sorted list, each in [lowest, num_layers - 1]."""
  if text is None:
    return list(range(lowest, num_layers))
  try:
    if "-" in text:
      a, b = (int(x) for x in text.split("-"))
      layers = list(range(a, b + 1))
    else:
      layers = sorted({int(x) for x in text.split(",")})
  except ValueError:
    raise InputError(f"--layers {text!r}: expected 'A-B' or 'A,B,C' with integer layers") from None
  bad = [k for k in layers if not lowest <= k < num_layers]
  if not layers or bad:
    raise InputError(f"--layers {text!r}: layers must lie in [{lowest}, {num_layers - 1}]")
  return layers


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
  clear = adv > 2 * se
  after = [i for i in range(len(layers)) if not clear[i:].any()]
  return (layers[after[0]] if after else None), adv, se


def sweep(m, questions, image_folder, answer_key, method, keep, layers, seeds, batch,
          max_new_tokens) -> dict:
  """Accuracies (overall and per category) of the method and of each random draw per layer."""
  def answer(text, positions, seed):
    return eval_vqa.evaluate(m, questions, image_folder, answer_key,
                             schedule=schedule_lib.parse(text, positions=positions),
                             batch_size=batch, max_new_tokens=max_new_tokens, progress=False,
                             seed=seed)
  rows, n = [], None
  for k in layers:
    stage = f"{method}@{k}:{keep}"
    positions = schedule_lib.parse(stage)[0].positions
    res = answer(stage, None, 0)
    rnd = [answer(f"random@{k}:{keep}", positions, s) for s in range(seeds)]
    n = res["answered"]
    rows.append({"layer": k, "method": _scores(res), "random": [_scores(x) for x in rnd]})
    print(f"  layer {k}: {method} {100 * res['overall']:.1f}%  random "
          f"{100 * np.mean([x['overall'] for x in rnd]):.1f}%", flush=True)
  return {"rows": rows, "scored": n}


def _scores(res: dict) -> dict:
  return {"overall": res["overall"], **res["per_category"]}


def analyze(args) -> dict:
  m = api.load(args.model)
  if not hasattr(m.config, "num_image_tokens"):
    raise InputError(f"{args.model}: analyses need a LLaVA-family model, got {m.family}")
  if args.random_seeds < 1:
    raise InputError(f"--random-seeds must be >= 1, got {args.random_seeds}")
  n_l = m.config.text.num_layers
  keep = schedule_lib.keep_count(schedule_lib.parse(f"random@1:{args.keep}")[0].keep,
                                 m.config.num_image_tokens)
  if not 1 <= keep <= m.config.num_image_tokens:
    raise InputError(f"--keep {args.keep}: keeps {keep} of {m.config.num_image_tokens} visual "
                     "tokens; it must keep between 1 and all of them")
  layers = parse_layers(args.layers, schedule_lib.min_layer(args.method), n_l)
  questions = _limited(args)
  sw = sweep(m, questions, args.image_folder, args.answer_key, args.method, keep, layers,
             args.random_seeds, args.batch_size, args.max_new_tokens)
  cats = [c for c in sw["rows"][0]["method"] if c != "overall"]
  curves = {}
  for c in ["overall", *cats]:
    a_m = [r["method"][c] for r in sw["rows"]]
    a_r = np.array([[x[c] for x in r["random"]] for r in sw["rows"]]).T
    cross, adv, se = crossover_layer(layers, a_m, a_r, sw["scored"])
    curves[c] = {"method": a_m, "random_mean": a_r.mean(0).tolist(),
                 "random_std": a_r.std(0).tolist(), "advantage": adv.tolist(),
                 "standard_error": se.tolist(), "crossover_layer": cross}
  return {"model": str(m.path), "method": args.method, "keep": keep,
          "visual_tokens": m.config.num_image_tokens, "num_layers": n_l, "layers": layers,
          "random_seeds": args.random_seeds, "questions_scored": sw["scored"],
          "crossover_layer": curves["overall"]["crossover_layer"], "curves": curves,
          "rule": "first swept layer from which (method - mean random) <= 2 standard errors "
                  "at every later swept layer", "raw": sw["rows"]}


def _limited(args):
  """The question file, or a temporary copy of its first --limit lines."""
  if args.limit is None:
    return args.questions
  rows = vqa.read_questions(args.questions)[:args.limit]
  path = Path(args.out) / f"questions_first_{args.limit}.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  vqa.write_jsonl(path, rows)
  return path


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
  np.atleast_1d(axes)[0].set_ylabel(f"accuracy (%), keep {res['keep']}/{res['visual_tokens']}")
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
