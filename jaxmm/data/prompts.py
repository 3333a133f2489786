"""Model inputs for (image, question) pairs through a model folder's own processor.

The question goes through the folder's chat template (a user turn: the image, then the text),
and the processor turns images and texts into the arrays the model takes, named as
transformers names them (input_ids, attention_mask, pixel_values, and the family's extras:
image_sizes for LLaVA-NeXT, image_grid_thw and mm_token_type_ids for Qwen2-VL, ...). The dict
goes whole to `jaxmm.forward` / `jaxmm.generate`, which check it through the model's family.
"""
import numpy as np

from jaxmm.data import processors
from jaxmm.errors import InputError

# Batches are left padded to their longest prompt rounded up to this multiple: the compiled
# shapes depend on the padded length, so rounding bounds the compiles over a question file.
PAD_MULTIPLE = 8


def _message(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Prompter:
  """Chat-templated, left-padded inputs through the processor of a model folder."""

  def __init__(self, folder):
    self.folder = folder
    self.proc = processors.load_processor(folder)
    self.tok = self.proc.tokenizer

  def text(self, question: str) -> str:
    """The prompt for one image and `question`, ending with the assistant's turn."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    try:
      return self.proc.apply_chat_template(msgs, add_generation_prompt=True)
    except ValueError as e:
      raise InputError(f"{self.folder}: {_message(e)}") from None

  def inputs(self, images, texts, multiple: int = PAD_MULTIPLE) -> dict:
    """The processor's outputs as NumPy arrays for the texts and their images (none: text-only
    prompts), left padded to the longest prompt rounded up to a multiple of `multiple`."""
    try:
      enc = self.proc(images=list(images) or None, text=list(texts), padding="longest",
                      padding_side="left", pad_to_multiple_of=multiple, return_tensors="np")
    except ValueError as e:
      raise InputError(f"the processor of {self.folder} rejects these inputs: "
                       f"{_message(e)}") from None
    return {k: np.asarray(v) for k, v in enc.items()}
