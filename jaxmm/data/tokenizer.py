"""Local tokenizers and LLaVA processors built from a word list (nothing is downloaded).

Used by the demo and by models trained from scratch: a whitespace word-level tokenizer that
transformers loads with `AutoTokenizer`, and a `LlavaProcessor` (CLIP image preprocessing plus
the chat template) that `AutoProcessor` loads from the same folder.
"""
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast

try:  # transformers 5 without torchvision: the PIL backend, imported directly to avoid a warning
  from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover
  from transformers import CLIPImageProcessor as _ImageProcessor

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
# USER: <image> question ASSISTANT: answer</s>  -- the LLaVA-1.5 conversation layout, no system prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% else %}ASSISTANT: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{{ m['content'][0]['text'] }}{% endif %} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def word_tokenizer(words) -> PreTrainedTokenizerFast:
  """Whitespace word-level tokenizer: ids 0..4 are SPECIALS, then USER:/ASSISTANT:, then `words`."""
  vocab = {}
  for w in (*SPECIALS, "USER:", "ASSISTANT:", *words):
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>", padding_side="left", chat_template=CHAT_TEMPLATE,
      extra_special_tokens={"image_token": "<image>"})


def llava_processor(tokenizer, image_size: int, patch_size: int,
                    strategy: str = "default") -> LlavaProcessor:
  """A LlavaProcessor: resize + centre crop to `image_size`, CLIP normalisation, chat template."""
  images = _ImageProcessor(size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size})
  return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                        vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                        image_token="<image>", num_additional_image_tokens=1)
