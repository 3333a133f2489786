"""The `jaxmm` console script: one entry point, subcommands implemented in their own modules.

Each command module defines `add_args(parser)` and `run(args) -> int`, and ends with
`if __name__ == "__main__": raise SystemExit(jaxmm.cli.module_main(__name__))` so that it also
runs as `python -m MODULE`.
"""
import argparse
import importlib
import sys

from jaxmm.errors import JaxmmError

# (command words) -> module. Add a line here to add a command.
COMMANDS = {
    ("convert",): "converters.cli",
    ("generate",): "jaxmm.generate_cli",
    ("prune-bench",): "eval.prune_bench",
    ("analyze", "ecl"): "eval.analyze_ecl",
    ("analyze", "horizon"): "eval.analyze_horizon",
    ("analyze", "crossover"): "eval.analyze_crossover",
    ("export",): "converters.export",
    ("train", "vlm"): "train.vlm",
    ("eval", "vqa"): "eval.vqa",
    ("train", "cadit"): "train.cadit",
    ("eval", "digits-da"): "eval.digits_da",
    ("train", "mgfte"): "train.mgfte",
    ("eval", "mgfte"): "eval.mgfte",
}


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxmm", description=__doc__.splitlines()[0])
  groups = {(): parser.add_subparsers(dest="cmd0", required=True, metavar="COMMAND")}
  for words, module in COMMANDS.items():
    for depth in range(1, len(words)):
      prefix = words[:depth]
      if prefix not in groups:
        sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} subcommands")
        groups[prefix] = sub.add_subparsers(dest=f"cmd{depth}", required=True, metavar="SUBCOMMAND")
    sub = groups[words[:-1]].add_parser(words[-1], help=f"see `jaxmm {' '.join(words)} --help`",
                                        add_help=False)
    sub.set_defaults(_module=module, _words=words)
  return parser


def _run_module(module_name: str, argv, prog: str) -> int:
  mod = importlib.import_module(module_name)
  parser = argparse.ArgumentParser(prog=prog, description=(mod.__doc__ or "").strip().splitlines()[0]
                                   if mod.__doc__ else None)
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
