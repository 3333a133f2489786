"""The digits_vqa task's functions. lmms-eval loads this file by path, so images are found
relative to it; each doc is a line of docs.jsonl: {question_id, image, text, category, answer}."""
from pathlib import Path

from PIL import Image

from jaxmm.data.vqa import normalize

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc) -> list:
  with Image.open(HERE / doc["image"]) as im:
    return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
  return doc["text"]


def process_results(doc, results) -> dict:
  """1.0 / 0.0 under "overall" and under the doc's category: each metric's mean is the
  accuracy `jaxmm eval vqa` reports for it."""
  right = float(normalize(results[0]) == normalize(str(doc["answer"])))
  return {"overall": right, doc["category"]: right}
