"""The `jaxmm` console script: one entry point, subcommands implemented in their own modules.

Each command module defines `add_args(parser)` and `run(args) -> int`, and ends with
`if __name__ == "__main__": raise SystemExit(jaxmm.cli.module_main(__name__))` so that it also
runs as `python -m MODULE`.
"""
import argparse
import importlib
import sys
from typing import NamedTuple

from jaxmm.errors import JaxmmError


class Command(NamedTuple):
  """A subcommand: its module, and the `jaxmm --help` line, which is `summary(module.__doc__)`
  (written out so that --help imports no command module; tests/test_cli.py keeps them equal)."""
  module: str
  help: str


# (command words) -> Command. Add an entry here to add a command (help: its docstring's summary).
COMMANDS = {
    ("convert",): Command(
        "jaxmm.converters.cli",
        "Convert a Hugging Face checkpoint folder (or a .gguf file) into a jaxmm model folder."),
    ("generate",): Command(
        "jaxmm.generate_cli",
        "Generate an answer with a converted model: "
        "`jaxmm generate --model OUT --image PATH --prompt TEXT`."),
    ("prune-bench",): Command(
        "jaxmm.eval.prune_bench",
        "Visual-token pruning benchmark: FLOPs, prefill latency, scoring overhead and logit "
        "change."),
    ("analyze", "ecl"): Command(
        "jaxmm.eval.analyze_ecl",
        "Entropy Collapse Layer: per-layer visual-token entropy curves over a calibration "
        "question set."),
    ("analyze", "horizon"): Command(
        "jaxmm.eval.analyze_horizon",
        "Information horizon: per layer and question category, how much a lone 2x2 window of "
        "visual tokens still changes the probability of the answer's first token "
        "(pruning.md §4.1)."),
    ("analyze", "crossover"): Command(
        "jaxmm.eval.analyze_crossover",
        "Where a pruning method stops beating random: accuracy against the pruning layer."),
    ("plan",): Command(
        "jaxmm.plan",
        "Memory plan of a model on a device mesh: parameters and KV cache per device, from "
        "shapes only."),
    ("calibrate",): Command(
        "jaxmm.eval.calibrate",
        "Derive a pruning schedule from the model's own Entropy Collapse Layer and information "
        "horizon."),
    ("export",): Command(
        "jaxmm.converters.export",
        "Export a jaxmm LLaVA as a transformers folder: "
        "`jaxmm export MODEL HF_OUT [--overwrite]`."),
    ("train", "vlm"): Command(
        "jaxmm.train.vlm",
        "Train a small LLaVA from scratch on digits-VQA: `jaxmm train vlm --out OUT`."),
    ("eval", "vqa"): Command(
        "jaxmm.eval.vqa",
        "Answer a LLaVA-format question file with a jaxmm vision-language model, and score "
        "it."),
    ("eval", "lmms-task"): Command(
        "jaxmm.eval.lmms_task",
        "Write the lmms-eval task digits_vqa for a LLaVA-format question file, answer key and "
        "images."),
    ("train", "cadit"): Command(
        "jaxmm.train.cadit",
        "Train CADIT (or the source-only / DANN baselines) on a digits domain-adaptation task."),
    ("eval", "digits-da"): Command(
        "jaxmm.eval.digits_da",
        "Target test accuracy of trained CADIT / source-only / DANN models on their digits tasks."),
    ("train", "mgfte"): Command(
        "jaxmm.train.mgfte",
        "Train MG-FTE (or the prototype baseline) on FewRel episodes; resumable, "
        "best-by-validation."),
    ("eval", "mgfte"): Command(
        "jaxmm.eval.mgfte",
        "Evaluate a trained MG-FTE (or baseline) on seeded FewRel test episodes (mgfte.md §5)."),
}


def summary(doc: str | None) -> str:
  """A docstring's summary: its first paragraph on one line ("" for no docstring)."""
  return " ".join((doc or "").strip().split("\n\n")[0].split())


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxmm", description=summary(__doc__))
  groups = {(): parser.add_subparsers(dest="cmd0", required=True, metavar="COMMAND")}
  for words, command in COMMANDS.items():
    for depth in range(1, len(words)):
      prefix = words[:depth]
      if prefix not in groups:
        sub = groups[prefix[:-1]].add_parser(prefix[-1], help=_group_help(prefix))
        groups[prefix] = sub.add_subparsers(dest=f"cmd{depth}", required=True, metavar="SUBCOMMAND")
    sub = groups[words[:-1]].add_parser(words[-1], help=command.help, add_help=False)
    sub.set_defaults(_module=command.module, _words=words)
  return parser


def _group_help(prefix: tuple) -> str:
  """The help of a word that only groups commands (e.g. `train`): "subcommands: a, b"."""
  n = len(prefix)
  children = dict.fromkeys(w[n] for w in COMMANDS if len(w) > n and w[:n] == prefix)
  return "subcommands: " + ", ".join(children)


def _run_module(module_name: str, argv, prog: str) -> int:
  mod = importlib.import_module(module_name)
  parser = argparse.ArgumentParser(prog=prog, description=summary(mod.__doc__) or None)
  mod.add_args(parser)
  args = parser.parse_args(argv)
  try:
    return int(mod.run(args) or 0)
  except JaxmmError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def module_main(module_name: str, argv=None) -> int:
  """Entry point for `python -m MODULE`."""
  return _run_module(module_name, sys.argv[1:] if argv is None else argv, f"python -m {module_name}")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = _build_parser()
  # Parse only the command words; the rest belongs to the command's own parser.
  ns, rest = parser.parse_known_args(argv)
  words = ns._words
  return _run_module(ns._module, rest, "jaxmm " + " ".join(words))


if __name__ == "__main__":
  raise SystemExit(main())
