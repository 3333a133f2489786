"""A jaxmm LLaVA against its `jaxmm export` in transformers, on a LLaVA-format question file.

  python -m jaxmm.eval.export_parity --model M --questions Q.jsonl --image-folder DIR
                               [--n 60] [--batch-size 20] [--max-new-tokens 4] [--out JSON]

Exports MODEL to a temporary folder, loads it with transformers' `LlavaForConditionalGeneration`
and `AutoProcessor` (so preprocessing and the chat template are transformers' own), and for the
first N questions compares, batch by batch (left padded): the prompt logits at every real token
(max |diff|), and the greedy answers of `jaxmm.generate` and transformers' `generate`.
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np

import jaxmm.cli
from jaxmm.converters.export import export_folder
from jaxmm import api, checkpoint
from jaxmm.data import vqa
from jaxmm.errors import InputError


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="jaxmm LLaVA folder")
  p.add_argument("--questions", required=True, help="LLaVA-format question JSONL")
  p.add_argument("--image-folder", required=True)
  p.add_argument("--n", type=int, default=60, help="questions compared (the first N)")
  p.add_argument("--batch-size", type=int, default=20)
  p.add_argument("--max-new-tokens", type=int, default=4)
  p.add_argument("--out", help="JSON results file")


def hf_inputs(proc, images, questions):
  """(ids, mask, pixel_values) as numpy, left padded: transformers' own chat template and
  processor applied to PIL `images` and their `questions` (one image per question)."""
  proc.tokenizer.padding_side = "left"
  texts = [proc.apply_chat_template([{"role": "user", "content": [
      {"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
      for q in questions]
  enc = proc(images=images, text=texts, padding=True, return_tensors="np")
  return enc["input_ids"], enc["attention_mask"], enc["pixel_values"]


def _batch(proc, rows, image_folder):
  from PIL import Image
  images = [Image.open(Path(image_folder) / r["image"]).convert("RGB") for r in rows]
  return hf_inputs(proc, images, [r["text"] for r in rows])


def _strip(seq, stop: set) -> list:
  out = []
  for t in seq.tolist():
    if t in stop:
      break
    out.append(t)
  return out


def compare(m, hf_dir: Path, rows, image_folder, batch: int, max_new_tokens: int) -> dict:
  import torch
  from transformers import AutoProcessor, LlavaForConditionalGeneration
  hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
  proc = AutoProcessor.from_pretrained(hf_dir)
  stop = {m.config.text.pad_token_id, *m.config.text.eos_token_ids}
  max_diff, same, answers = 0.0, 0, []
  for s in range(0, len(rows), batch):
    chunk = rows[s:s + batch]
    ids, mask, px = _batch(proc, chunk, image_folder)
    t = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
         "pixel_values": torch.tensor(px)}
    pos = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    with torch.no_grad():
      ref = hf(**t, position_ids=pos).logits.numpy()
      ref_gen = hf.generate(**t, max_new_tokens=max_new_tokens, do_sample=False)
    ours = np.asarray(api.forward(m, input_ids=ids, attention_mask=mask, pixel_values=px).logits)
    max_diff = max(max_diff, float(np.abs(ours - ref)[mask.astype(bool)].max()))
    gen = np.asarray(api.generate(m, input_ids=ids, attention_mask=mask, pixel_values=px,
                                  max_new_tokens=max_new_tokens))
    for r, a, b in zip(chunk, gen, ref_gen[:, ids.shape[1]:].numpy()):
      a, b = _strip(a, stop), _strip(b, stop)
      same += a == b
      answers.append({"question_id": r["question_id"], "jaxmm": proc.tokenizer.decode(a),
                      "transformers": proc.tokenizer.decode(b)})
  return {"questions": len(rows), "same_greedy_answers": same,
          "max_abs_logit_diff": max_diff, "answers": answers}


def run(args) -> int:
  m = api.load(args.model)
  if m.family != "llava":
    raise InputError(f"export parity needs a LLaVA model, {args.model} is {m.family!r}")
  rows = vqa.read_questions(args.questions)[:args.n]
  if not rows:
    raise InputError(f"{args.questions}: no questions")
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = export_folder(m, Path(tmp) / "hf")
    res = {"model": str(m.path), **compare(m, hf_dir, rows, args.image_folder, args.batch_size,
                                           args.max_new_tokens)}
  print(f"{res['same_greedy_answers']}/{res['questions']} greedy answers identical; "
        f"max |logit diff| {res['max_abs_logit_diff']:.2e}")
  if args.out:
    checkpoint.write_json(args.out, res)
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
