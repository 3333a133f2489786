"""The `jaxmm` console script: generate end to end on a tiny converted LLaVA, and its errors."""
import subprocess
import sys

import pytest

from jaxmm.converters.cli import convert_folder
from jaxmm import cli
from tiny_hf import WORDS, build_hf_folder, digit_png


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  build_hf_folder(root / "hf")
  convert_folder(root / "hf", root / "jaxmm")
  digit_png(root / "digit.png")
  return root


def test_generate_prints_an_answer(tiny_model, capsys):
  rc = cli.main(["generate", "--model", str(tiny_model / "jaxmm"), "--image",
                 str(tiny_model / "digit.png"), "--prompt", "what digit is this ?",
                 "--max-new-tokens", "4"])
  out = capsys.readouterr().out.strip().split()
  assert rc == 0
  assert 1 <= len(out) <= 4 and all(w in WORDS for w in out)


@pytest.mark.parametrize("args,needle", [
    (["--prompt", " "], "prompt is empty"),
    (["--prompt", "what ?", "--image", "/nonexistent.png"], "cannot read image"),
    (["--prompt", "what ?"], "needs --image"),
])
def test_generate_errors_are_one_line(tiny_model, capsys, args, needle):
  base = ["generate", "--model", str(tiny_model / "jaxmm")]
  if needle != "needs --image" and "--image" not in args:
    args = args + ["--image", str(tiny_model / "digit.png")]
  assert cli.main(base + args) == 2
  err = capsys.readouterr().err.strip()
  assert needle in err and len(err.splitlines()) == 1 and err.startswith("error:")


def test_missing_model_folder_is_a_clean_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxmm.cli", "generate", "--model",
                         str(tmp_path / "nope"), "--prompt", "hi"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: model folder {tmp_path / 'nope'} does not exist"]


def test_every_command_has_help():
  for words in cli.COMMANDS:
    proc = subprocess.run([sys.executable, "-m", "jaxmm.cli", *words, "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout, words


def _help(argv, capsys, monkeypatch):
  """(exit code, stdout) of `jaxmm ARGV --help`, run in-process and unwrapped."""
  monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help text at hyphens; keep it one line
  with pytest.raises(SystemExit) as e:
    cli.main([*argv, "--help"])
  return e.value.code, " ".join(capsys.readouterr().out.split())


def _groups():
  """Every word sequence that only groups commands, the top level () included."""
  return sorted({words[:d] for words in cli.COMMANDS for d in range(len(words))})


def test_help_lists_every_command_with_its_description(capsys, monkeypatch):
  for words, command in cli.COMMANDS.items():
    assert command.help.strip() and not command.help.startswith("see `jaxmm"), words
    code, out = _help(words[:-1], capsys, monkeypatch)  # `jaxmm --help`, `jaxmm train --help`...
    assert code == 0 and f" {words[-1]} {command.help}" in out, words


def test_command_descriptions_are_their_module_docstrings():
  """The table is written out so that `jaxmm --help` imports no command module; it must not
  drift from the docstrings."""
  import importlib
  for words, command in cli.COMMANDS.items():
    assert command.help == cli.summary(importlib.import_module(command.module).__doc__), words


def test_every_help_exits_zero_in_process(capsys, monkeypatch):
  for words in _groups():
    code, out = _help(words, capsys, monkeypatch)
    assert code == 0 and out.startswith(" ".join(("usage: jaxmm",) + words)), words
  for words, command in cli.COMMANDS.items():
    code, out = _help(words, capsys, monkeypatch)
    assert code == 0 and out.startswith(f"usage: jaxmm {' '.join(words)} "), words
    assert command.help in out, words
