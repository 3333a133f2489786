"""Evaluate a trained MG-FTE (or baseline) on seeded FewRel test episodes (mgfte.md §5).

Prints entity-pair P/R/F1, relation accuracy and triple P/R/F1 (percent, means over episodes)
for each N-way-K-shot setting; `--out` also writes them as JSON.
"""

import jaxmm.cli
from jaxmm import checkpoint
from jaxmm.data import fewrel
from jaxmm.errors import JaxmmError
from jaxmm.mgfte import training


def add_args(p):
  p.add_argument("--model", required=True, help="folder written by `jaxmm train mgfte` (OUT/best)")
  p.add_argument("--split", default=fewrel.SPLITS["test"], help="split spec FILE[:REL,...]")
  p.add_argument("--settings", default="5-5,10-10", help="comma-separated N-K pairs")
  p.add_argument("--q", type=int, default=5, help="queries per class")
  p.add_argument("--episodes", type=int, default=1000)
  p.add_argument("--seed", type=int, default=3000)
  p.add_argument("--max-per-relation", type=int, help="use only the first k instances per relation")
  p.add_argument("--length-buckets", default="48,64,90",
                 help="cut each episode to the smallest of these lengths holding it (exact; '' = off)")
  p.add_argument("--out", help="write the scores as JSON here")


def parse_settings(text: str) -> list:
  try:
    pairs = [tuple(int(x) for x in s.split("-")) for s in text.split(",") if s]
  except ValueError:
    pairs = []
  if not pairs or any(len(p) != 2 for p in pairs):
    raise JaxmmError(f"--settings must look like 5-5,10-10; got {text!r}")
  return pairs


def format_table(results: dict) -> str:
  head = ("setting", "ent P", "ent R", "ent F1", "rel acc", "tri P", "tri R", "tri F1")
  lines = [" | ".join(f"{h:>8}" for h in head)]
  for name, s in results.items():
    vals = [s["entity"]["p"], s["entity"]["r"], s["entity"]["f1"], s["relation"],
            s["triple"]["p"], s["triple"]["r"], s["triple"]["f1"]]
    lines.append(" | ".join([f"{name:>8}"] + [f"{100 * v:8.2f}" for v in vals]))
  return "\n".join(lines)


def run(args) -> int:
  settings = parse_settings(args.settings)
  bcfg, mcfg, params = training.load_extractor(args.model)
  tok = fewrel.load_tokenizer(args.model)
  data = fewrel.load_split(args.split, tok, max_per_relation=args.max_per_relation)
  predict = training.make_predict(bcfg, mcfg)
  results = {}
  for n, k in settings:
    results[f"{n}w{k}s"] = training.evaluate(predict, params, data, n_way=n, k_shot=k,
                                             n_query=args.q, episodes=args.episodes,
                                             seed=args.seed, desc=f"{n}-way-{k}-shot",
                                             buckets=training.parse_buckets(args.length_buckets))
  print(format_table(results))
  if args.out:
    checkpoint.write_json(args.out, {"model": str(args.model), "split": args.split,
                                          "episodes": args.episodes, "seed": args.seed,
                                          "q": args.q, "variant": mcfg.variant,
                                          "results": results})
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
