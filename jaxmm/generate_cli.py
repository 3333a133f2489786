"""Generate an answer with a converted model: `jaxmm generate --model OUT --image PATH --prompt TEXT`.

The prompt goes through the model's chat template and, for a vision-language model (LLaVA,
LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL), the image through the model's own processor (from the
tokenizer/processor files that `jaxmm convert` copied into OUT); the processor's outputs go
whole to `jaxmm.generate`. Decoding is greedy with a KV cache.
"""
import argparse
from pathlib import Path

import numpy as np

import jaxmm.cli
from jaxmm import api, flops, registry, sharding
from jaxmm.data import processors, prompts
from jaxmm.errors import InputError
from jaxmm.models import core
from jaxmm.pruning import schedule as schedule_lib


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="a folder written by `jaxmm convert`")
  p.add_argument("--image", help="image file (required for vision-language models)")
  p.add_argument("--prompt", required=True, help="the user's question")
  p.add_argument("--max-new-tokens", type=int, default=32)
  p.add_argument("--schedule", help="prune visual tokens at prefill: METHOD@LAYER:KEEP[,...], "
                 "e.g. entropy@2:50%% or divprune@0:64,random@5:16")
  p.add_argument("--positions", choices=schedule_lib.POSITIONS,
                 help="position ids after pruning (default: each method's reference convention)")
  p.add_argument("--seed", type=int, default=0, help="seed of random pruning")
  sharding.add_args(p)


def _load_image(path):
  from PIL import Image, UnidentifiedImageError
  try:
    return Image.open(path).convert("RGB")
  except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
    raise InputError(f"cannot read image {path}: {e}") from None


def prepare(model_dir, prompt: str, image_path=None, family="llava"):
  """(inputs, tokenizer): the prompt through the folder's chat template, as NumPy arrays with
  transformers' names for `jaxmm.generate`. A vision-language family needs an image and reads
  the folder's processor (`jaxmm.data.prompts`); a text-only family its tokenizer."""
  if not prompt.strip():
    raise InputError("the prompt is empty")
  if registry.takes_images(family):
    if image_path is None:
      raise InputError(f"a {family} model needs --image")
    pr = prompts.Prompter(model_dir)
    return pr.inputs([_load_image(image_path)], [pr.text(prompt)], multiple=1), pr.tok
  if image_path is not None:
    raise InputError(f"a {family} model is text-only: it takes no --image")
  tok = processors.load_tokenizer(model_dir)
  ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
  ids = np.asarray(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)[None]
  return {"input_ids": ids, "attention_mask": np.ones_like(ids)}, tok


def answer(m, prompt: str, image_path=None, max_new_tokens: int = 32) -> str:
  """The decoded greedy answer of a loaded model to one prompt (and image)."""
  inputs, tok = prepare(m.path, prompt, image_path, m.family)
  new = api.generate(m, max_new_tokens=max_new_tokens, **inputs)
  return tok.decode(new[0], skip_special_tokens=True).strip()


def pruned_answer(m, prompt: str, image_path, max_new_tokens: int, schedule: str,
                  positions=None, seed: int = 0) -> tuple[str, list[str]]:
  """(answer, report lines): the greedy answer under a pruning schedule, the visual tokens kept
  at each stage and the prefill FLOPs reduction (convention B, this prompt's own lengths: its
  visual and text counts as the model's family counts them)."""
  inputs, tok = prepare(m.path, prompt, image_path, m.family)
  sched = schedule_lib.parse(schedule, positions)
  new, kept, resolved = api.generate(m, max_new_tokens=max_new_tokens, schedule=sched, seed=seed,
                                     return_kept=True, **inputs)
  prepared = core.prepare(m.family, m.config, inputs)
  n_vis, n_text = int(prepared.visual_B[0]), int(prepared.text_B[0])
  red = flops.reduction(resolved, n_text, n_vis, flops.Dims.from_config(m.config), "B")
  lines = [f"visual tokens: {n_vis} at the input"]
  lines += [f"  {st.method}@{st.layer}: kept {int((k[0] >= 0).sum())}" for st, k in
            zip(resolved, kept)]
  lines.append(f"prefill FLOPs of the decoder layers: -{100 * red:.1f}% (convention B)")
  return tok.decode(new[0], skip_special_tokens=True).strip(), lines


def run(args) -> int:
  m = api.load(Path(args.model), mesh=sharding.mesh_from_args(args), sharding=args.sharding)
  with sharding.activate(m.mesh):
    return _answer(m, args)


def _answer(m, args) -> int:
  if args.schedule is None:
    if args.positions is not None:
      raise InputError("--positions applies to a --schedule")
    print(answer(m, args.prompt, args.image, args.max_new_tokens))
    return 0
  text, lines = pruned_answer(m, args.prompt, args.image, args.max_new_tokens, args.schedule,
                              args.positions, args.seed)
  print(text)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
