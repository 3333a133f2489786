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


def test_every_command_has_help(capsys, monkeypatch):
  """Each command's own parser (its module imported and run as `jaxmm ... --help` would)."""
  for words in cli.COMMANDS:
    code, out = _help(list(words), capsys, monkeypatch)
    assert code == 0 and out.startswith("usage:"), words


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


@pytest.mark.parametrize("drop, what", [(("tokenizer.json",), "tokenizer"),
                                        (("preprocessor_config.json", "processor_config.json"),
                                         "image processor")])
def test_a_folder_without_its_tokenizer_or_processor_is_one_error_line(tiny_model, tmp_path,
                                                                       capsys, drop, what):
  import shutil
  folder = tmp_path / "model"
  shutil.copytree(tiny_model / "jaxmm", folder)
  for name in drop:
    (folder / name).unlink(missing_ok=True)
  questions = tmp_path / "q.jsonl"
  questions.write_text('{"question_id": 1, "image": "digit.png", "text": "what ?"}\n')
  runs = [["generate", "--model", str(folder), "--image", str(tiny_model / "digit.png"),
           "--prompt", "what ?"],
          ["eval", "vqa", "--model", str(folder), "--questions", str(questions),
           "--image-folder", str(tiny_model), "--answers-file", str(tmp_path / "a.jsonl")]]
  for argv in runs:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert f"has no {what} files" in err and "jaxmm convert" in err


def test_generate_prunes_with_a_schedule_and_reports_it(tiny_model, capsys):
  from jaxmm import api, flops
  from jaxmm.generate_cli import prepare
  from jaxmm.pruning import schedule as schedule_lib
  model, image = tiny_model / "jaxmm", tiny_model / "digit.png"
  args = ["generate", "--model", str(model), "--image", str(image), "--prompt",
          "what digit is this ?", "--max-new-tokens", "3", "--schedule",
          "divprune@0:50%,random@1:10", "--positions", "preserve", "--seed", "3"]
  assert cli.main(args) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  m = api.load(model)
  inputs, tok = prepare(model, "what digit is this ?", image)
  sched = "divprune@0:50%,random@1:10"
  want = api.generate(m, max_new_tokens=3, schedule=schedule_lib.parse(sched, "preserve"), seed=3,
                      **inputs)
  assert lines[0] == tok.decode(want[0], skip_special_tokens=True).strip()
  assert lines[1:4] == ["visual tokens: 64 at the input", "  divprune@0: kept 32",
                        "  random@1: kept 10"]
  n_text = int(inputs["attention_mask"].sum()) - 64
  red = flops.reduction("divprune@0:32,random@1:10", n_text, 64, flops.Dims.from_config(m.config))
  assert lines[4] == f"prefill FLOPs of the decoder layers: -{100 * red:.1f}% (convention B)"
  assert cli.main(args[:9] + ["--positions", "compact"]) == 2   # --positions without a schedule
  assert "applies to a --schedule" in capsys.readouterr().err
