"""Shared by the `jaxmm analyze` commands: one question at a time, captured.

Prompts go through the model's own chat template and processor (`jaxmm.data.prompts`, as in
`jaxmm eval vqa`), whose outputs go whole to `jaxmm.forward`; each is left padded to a multiple
of 8 slots, so the captured forward compiles once per padded length (and image-shape bucket).
Any vision-language family works: visual tokens, their counts and positions come from the
model's family.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxmm import api, sharding
from jaxmm.analysis.capture import Capture
from jaxmm.data import prompts, vqa
from jaxmm.errors import InputError


def add_common_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="jaxmm vision-language model folder "
                 "(converted or trained)")
  p.add_argument("--questions", required=True, help="LLaVA-format question JSONL")
  p.add_argument("--image-folder", required=True, help="folder the `image` fields are relative to")
  p.add_argument("--out", required=True, help="folder for the JSON and PNG results")
  p.add_argument("--limit", type=int, help="use only the first N questions")
  sharding.add_args(p)


def load(args):
  """(model, question rows, Prompter). Rejects models that take no images."""
  from jaxmm.eval.vqa import require_images
  m = api.load(args.model, mesh=sharding.mesh_from_args(args), sharding=args.sharding)
  require_images(m, "the analyses")
  rows = vqa.read_questions(args.questions)[:args.limit]
  if not rows:
    raise InputError(f"{args.questions}: no questions")
  return m, rows, prompts.Prompter(m.path)


def questions(rows, pr, image_folder, desc: str):
  """Yields (row, inputs of that question alone) per readable question: NumPy arrays with
  transformers' names (`Prompter.inputs`); unreadable images are reported on stderr and
  skipped."""
  from jaxmm.eval.vqa import load_image
  for r in tqdm(rows, desc=desc, unit="q"):
    img, err = load_image(Path(image_folder) / str(r["image"]))
    if err:
      print(f"question {r['question_id']}: {err}", file=sys.stderr)
      continue
    yield r, pr.inputs([img], [pr.text(r["text"])])


def captured(m, rows, pr, image_folder, capture: Capture, desc: str):
  """Yields (row, inputs, out with `captured`, seconds) per readable question (`questions`)."""
  for r, inputs in questions(rows, pr, image_folder, desc):
    t0 = time.perf_counter()
    out = api.forward(m, capture=capture, **inputs)
    out.logits.block_until_ready()
    yield r, inputs, out, time.perf_counter() - t0


def timing(seconds: list) -> dict:
  """Seconds per question, all and excluding the first (which compiles)."""
  s = np.asarray(seconds, float)
  return {"questions": int(len(s)), "seconds_per_question": float(s.mean()) if len(s) else 0.0,
          "seconds_per_question_after_first": float(s[1:].mean()) if len(s) > 1 else None,
          "first_question_s": float(s[0]) if len(s) else None}


def model_name(path) -> str:
  """A model's display name: its folder, or the run folder when that is called `model` (as
  `jaxmm train vlm` writes it)."""
  p = Path(path)
  return p.parent.name if p.name == "model" else p.name


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def parse_layers(text: str | None, lowest: int, num_layers: int) -> list[int]:
  """'A-B', 'A,B,...' or a mix ('1-4,8,16') as a sorted list, each in [lowest, num_layers - 1]."""
  if text is None:
    return list(range(lowest, num_layers))
  layers = set()
  try:
    for part in text.split(","):
      a, _, b = part.partition("-")
      layers.update(range(int(a), int(b or a) + 1))
  except ValueError:
    raise InputError(f"--layers {text!r}: expected 'A-B', 'A,B,C' or a mix of them, with "
                     "integer layers") from None
  layers = sorted(layers)
  bad = [k for k in layers if not lowest <= k < num_layers]
  if not layers or bad:
    raise InputError(f"--layers {text!r}: layers must lie in [{lowest}, {num_layers - 1}]")
  return layers
