"""LLaVA-format VQA files: question JSONL in, answers-file JSONL out, answer keys.

A question line (LLaVA's `model_vqa_loader` input):  {"question_id", "image", "text", ...}
  any other fields (e.g. "category") are kept and passed through.
An answers-file line (LLaVA's output):  {"question_id", "prompt", "text", "answer_id", "model_id"}
An answer-key line:  {"question_id", "answer"} (+ optional "category"); LLaVA's POPE/ScienceQA keys
use other shapes, so the evaluator reads this one small documented shape.
"""
import json
from pathlib import Path

from jaxmm import checkpoint
from jaxmm.errors import InputError

QUESTION_FIELDS = ("question_id", "image", "text")


def read_jsonl(path, required=()) -> list[dict]:
  """Parses a JSONL file; blank lines are skipped. A bad line raises InputError with its number."""
  path = Path(path)
  if not path.is_file():
    raise InputError(f"{path}: no such file")
  rows = []
  with path.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{path}:{n}: malformed JSON line ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
      missing = [k for k in required if k not in row]
      if missing:
        raise InputError(f"{path}:{n}: missing field(s) {missing}")
      rows.append(row)
  return rows


def read_questions(path) -> list[dict]:
  """Question lines; every line needs question_id, image and text, and ids must be unique."""
  rows = read_jsonl(path, QUESTION_FIELDS)
  seen = set()
  for n, row in enumerate(rows, 1):
    if row["question_id"] in seen:
      raise InputError(f"{path}: question_id {row['question_id']!r} appears twice")
    seen.add(row["question_id"])
  return rows


def read_answer_key(path) -> dict:
  """question_id -> {"answer", "category"?}."""
  return {r["question_id"]: r for r in read_jsonl(path, ("question_id", "answer"))}


def write_jsonl(path, rows) -> None:
  """Writes rows as JSONL atomically (a temporary sibling renamed into place)."""
  checkpoint.atomic_file(path, lambda tmp: tmp.write_text(
      "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))


def normalize(answer: str) -> str:
  """Exact-match normal form: lower case, surrounding whitespace and a final period dropped."""
  return answer.strip().rstrip(".").strip().lower()
