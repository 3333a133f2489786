"""Write the lmms-eval task digits_vqa for a LLaVA-format question file, answer key and images.

  jaxmm eval lmms-task --questions Q.jsonl --image-folder DIR --answer-key KEY.jsonl --out TASKS
  python -m lmms_eval --model jaxmm --model_args pretrained=MODEL --include_path TASKS \
      --tasks digits_vqa --output_path OUT

TASKS receives the task as jaxmm ships it (eval/lmms_tasks/digits_vqa: the YAML and its
utils.py) and docs.jsonl, one doc per question in the question file's order: {question_id,
image (absolute path), text, category, answer}. A question's doc_id is thus its row number,
the example id `jaxmm eval vqa` draws random pruning from. Every question needs an answer, and
its category (the key's, else the question's, as `jaxmm eval vqa` scores it) must be one the
task reports: cell, count or presence (`jaxmm.data.digits_vqa.CATEGORIES`).
"""
import argparse
import shutil
from pathlib import Path

import jaxmm.cli
from jaxmm import checkpoint
from jaxmm.data import digits_vqa, vqa
from jaxmm.errors import InputError

TASK = "digits_vqa"
TASK_DIR = Path(__file__).resolve().parent / "lmms_tasks" / TASK
TASK_FILES = (f"{TASK}.yaml", "utils.py")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--questions", required=True, help="LLaVA-format question JSONL")
  p.add_argument("--image-folder", required=True, help="folder the `image` fields are relative to")
  p.add_argument("--answer-key", required=True, help="JSONL of {question_id, answer[, category]}")
  p.add_argument("--out", required=True, help="the task folder to write (replaced if it exists)")


def docs(questions, image_folder, answer_key) -> list[dict]:
  """The task's docs: each question with its answer, category and absolute image path."""
  key = vqa.read_answer_key(answer_key)
  out = []
  for q in vqa.read_questions(questions):
    qid = q["question_id"]
    if qid not in key:
      raise InputError(f"{answer_key} has no answer for question {qid!r}")
    cat = key[qid].get("category") or q.get("category") or "all"
    if cat not in digits_vqa.CATEGORIES:
      raise InputError(f"question {qid!r} has category {cat!r}; {TASK} scores "
                       f"{', '.join(digits_vqa.CATEGORIES)}")
    image = (Path(image_folder) / str(q["image"])).resolve()
    if not image.is_file():
      raise InputError(f"question {qid!r}: image {image} does not exist")
    out.append({"question_id": qid, "image": str(image), "text": q["text"], "category": cat,
                "answer": str(key[qid]["answer"])})
  return out


def write_task(out, questions, image_folder, answer_key) -> Path:
  """Writes the task folder `out` atomically; returns its YAML."""
  rows = docs(questions, image_folder, answer_key)
  with checkpoint.atomic_dir(out, overwrite=True) as tmp:
    for name in TASK_FILES:
      shutil.copyfile(TASK_DIR / name, tmp / name)
    vqa.write_jsonl(tmp / "docs.jsonl", rows)
  return Path(out) / TASK_FILES[0]


def run(args) -> int:
  yaml = write_task(args.out, args.questions, args.image_folder, args.answer_key)
  print(f"wrote {yaml}: run it with --include_path {yaml.parent} --tasks {TASK}")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
