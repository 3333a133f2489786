"""`jaxmm eval vqa` over two processes (jax.distributed on the CPU backend, gloo): each answers
every other question, process 0 merges; the answers file equals a one-process run's, random
pruning included (each question draws from its own example id)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

from jaxmm.cli import module_main
from jaxmm.data import digits_vqa
from jaxmm.train import vlm

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(model, d, answers, *extra):
  return [sys.executable, "-m", "jaxmm.cli", "eval", "vqa", "--model", str(model),
          "--questions", str(d / "q.jsonl"), "--image-folder", str(d), "--answers-file",
          str(answers), "--batch-size", "2", "--schedule", "divprune@0:8,random@1:4", *extra]


def test_two_processes_write_the_one_process_answers_file(tmp_path):
  model = vlm.Run(vlm.tiny()).save_model(tmp_path / "tiny-vlm")
  images, _ = digits_vqa.make_split(vlm.tiny().data, "test", 3, seed=0)
  for i, img in enumerate(images):
    Image.fromarray(img).convert("RGB").save(tmp_path / f"img{i}.png")
  texts = ["Is there a 3 in the grid?", "How many times does 1 appear in the grid?",
           "What digit is in row 1 and column 2 of the grid?"]
  qs = [{"question_id": i, "image": f"img{i % 3}.png", "text": texts[i % 3]} for i in range(5)]
  (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  # One process (this one), as `jaxmm eval vqa` runs it without the multi-host flags.
  assert module_main("jaxmm.eval.vqa", _cmd(model, tmp_path, tmp_path / "one.jsonl")[5:]) == 0
  port = _free_port()
  procs = [subprocess.Popen(_cmd(model, tmp_path, tmp_path / "two.jsonl", "--coordinator",
                                 f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                                 str(i)), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
  assert "answered 5/5" in outs[0][0] and "answered" not in outs[1][0]   # process 0 reports
  assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
  assert sorted(p.name for p in tmp_path.glob("two.jsonl*")) == ["two.jsonl"]
