"""Train a small LLaVA from scratch on digits-VQA: `jaxmm train vlm --out OUT`.

CLIP-style ViT -> 2-layer MLP projector -> LLaMA decoder, with a word-level tokenizer whose
vocabulary is the question/answer words. Each training sequence is a multi-turn conversation
about one image (LLaVA-1.5's training format: `USER: <image> q1 ASSISTANT: a1 </s> USER: q2 ...`);
the loss is next-token cross-entropy on the answer tokens (and their `</s>`) only, so one pass
over the visual tokens supervises several answers.

OUT receives ckpt/ (orbax; a killed run resumes from its last checkpoint), log.jsonl and model/
(a converted-format folder with the tokenizer and processor: `jaxmm.load(OUT / "model")`).
With `--llm FOLDER` (a converted `llama` model, e.g. SmolLM2-135M) the decoder is that model,
kept frozen, with its own tokenizer plus an `<image>` token; only the vision tower and the
projector train.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxmm.cli
from jaxmm import api, checkpoint
from jaxmm.config import ClipVisionConfig, LlamaConfig, LlavaConfig
from jaxmm.data import digits_vqa
from jaxmm.data.tokenizer import llava_processor, word_tokenizer
from jaxmm.errors import JaxmmError
from jaxmm.models import llava
from jaxmm.train import trainer, vlm_task
from jaxmm.train.trainer import init_lora, lora_merge

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Model sizes, data and optimisation of one training run."""
  data: digits_vqa.DigitsVQAConfig = digits_vqa.DigitsVQAConfig()
  patch_size: int = 4
  vision_width: int = 128
  vision_layers: int = 4
  vision_heads: int = 4
  text_width: int = 128
  text_layers: int = 8
  text_heads: int = 4
  text_kv_heads: int = 2
  train_images: int = 16384
  turns_per_category: int = 2     # questions of each category per training conversation
  steps: int = 600
  batch_size: int = 32
  lr: float = 2e-3
  vision_lr_mult: float = 1.0     # the vision tower, projector and auxiliary head train at lr * this
  schedule: str = "cosine"        # after the linear warmup: "cosine" (to 2% of lr) or "constant"
  b2: float = 0.98
  warmup: int = 50
  weight_decay: float = 0.01
  pos_init: str = "random"        # ViT position embeddings: "random" (std 0.02) or "sincos" (2-D)
  aux_weight: float = 0.0         # weight of the auxiliary per-cell digit loss (see `aux_logits`)
  tie_embeddings: bool = False    # the LM head is the transposed token embedding (as in SmolLM2)
  probe_weight: float = 0.0       # weight of the question-key probe loss (see `probe_loss`)
  probe_layer: int = 2            # the probe reads the hidden state after this many layers
  ground_weight: float = 0.0      # weight of the attention grounding loss (see `grounding_loss`)
  aux_pool: str = "cell"          # the digit loss reads each cell's mean token, every "token",
                                  # or only the tokens with "ink" (see `aux_logits`)
  ground_layer: int = 2           # the decoder layer (0-based) whose heads are grounded
  count_head: str = ""            # "histogram": also ground a counting head (`counting_head`)
  cell_weight: float = 0.0        # weight of the visual tokens' cell probe (see `cell_loss`)
  early_weight: float = 0.0       # weight of the early answer read-out (see `early_answer_loss`)
  early_layer: int = 4            # ... read from the hidden state after this many layers
  rope_theta: float = 10000.0     # decoder RoPE base; a large one leaves more slow, content dims
  drop_prob: float = 0.0          # per conversation: the chance that a step removes some of its
  drop_max: float = 0.9           # blank visual tokens, up to this fraction (`vlm_task.drop_blank`)
  lora_rank: int = 0              # > 0 (with a frozen --llm): LoRA adapters on every attention
                                  # projection, merged into the saved decoder (see `lora_merge`)
  seed: int = 0
  ckpt_every: int = 100
  log_every: int = 10

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    return cls(**{**d, "data": digits_vqa.DigitsVQAConfig(**d["data"])})


def default() -> TrainConfig:
  """The embedded default (`make demo`): 96 px grids of 3x3 cells, each cell 4x4 tiles of 8 px
  with the digit in one random tile; patch 8 -> 144 visual tokens, 9 of them with ink; 8-layer
  decoder of width 64.

  From scratch, the decoder settles on the answer prior: the answer depends on question and image
  only jointly, so neither half of the lookup gets a first-order gradient alone. What gets it
  past that, each a training-only loss (nothing is added to the saved model): the per-patch
  digit loss through the tied LM head (`aux_logits`), the question probe (`probe_loss`), the
  visual tokens' cell probe (`cell_loss`), attention grounding of a lookup head and of a
  histogram-counting head in another KV group (`grounding_loss`), and the answer read early,
  after layer 4 (`early_answer_loss`). Also: 2-D sin/cos ViT positions, a 3x learning rate on
  the image side and RoPE base 1e6 (more slowly rotating dimensions for content lookup).
  4000 steps of batch 8 (6-12 minutes on 2 CPU cores, by machine; with the rematerialised decoder,
  `llama.Decoder.remat`, data parallel over 4 CPU devices, `cpu_devices`): at 3000 steps the
  count answers were not reliably learned (the seed-0 model scored 92.8% overall with the
  one-device code of 2026-12-01, 95.3-96.7% with earlier numerics).
  """
  return TrainConfig(data=digits_vqa.DigitsVQAConfig(grid=3, cell_px=32, tiles=4), patch_size=8,
                     vision_width=64, vision_layers=2, text_width=64, text_layers=8,
                     batch_size=8, lr=3e-3, vision_lr_mult=3.0, b2=0.95,
                     pos_init="sincos", aux_weight=1.0, aux_pool="ink", tie_embeddings=True,
                     probe_weight=1.0, ground_weight=1.0, cell_weight=1.0, rope_theta=1e6,
                     count_head="histogram", early_weight=1.0, steps=4000)


def robust() -> TrainConfig:
  """The default trained with blank-token dropping (`drop_prob` 0.5, up to 90% of the blank
  tokens, `vlm_task.drop_blank`): the decoder learns that uninformative tokens and their
  positions may be missing, so a pruned prompt is no longer out of its training distribution.
  Same steps, so the same training time as the default.
  """
  return dataclasses.replace(default(), drop_prob=0.5, drop_max=0.9)


def tiny() -> TrainConfig:
  """Seconds-long runs for tests: 16 px / patch 4 (16 visual tokens), 2+2 layers of width 32."""
  return TrainConfig(data=digits_vqa.DigitsVQAConfig(grid=2, cell_px=8), vision_width=32,
                     vision_layers=2, vision_heads=2, text_width=32, text_layers=2, text_heads=2,
                     text_kv_heads=1, train_images=64, steps=6, batch_size=4, warmup=2,
                     ckpt_every=2, log_every=1)


def smollm2() -> TrainConfig:
  """For `--llm` = the converted SmolLM2-135M-Instruct (frozen, 30 layers of width 576): the
  default's images and image-side losses, patch 16 (36 visual tokens: each step runs the
  30-layer decoder forward and backward on 8 conversations, so the sequence is what costs), a
  ViT of width 128, and LoRA rank 8 on the attention projections (at lr 2e-3; the image side at
  3e-3), which learn the lookup that the grounding loss asks of head 0 of layer 26 (and the
  histogram of head 3).

  Why layer 26 of 30: grounded at layer 4 (as the demo grounds early), head 0 learned to find
  the asked patch but after 350 steps the answers were at chance (cell 10%, presence 50%): 25
  frozen MLPs lie between that lookup and the LM head. Near the top, the copied digit only has
  to pass three layers. No early answer read-out: the grounded layer is already near the head.
  """
  return dataclasses.replace(default(), patch_size=16, vision_width=128, vision_heads=4,
                             lr=2e-3, vision_lr_mult=1.5, probe_layer=26, ground_layer=26,
                             early_weight=0.0, lora_rank=8, steps=600, ckpt_every=50)


PRESETS = {"default": default, "robust": robust, "smollm2": smollm2, "tiny": tiny}


# Fields added after models were cached: they enter the fingerprint only when not at their
# default, so a cached model of an unchanged preset stays valid.
_LATER_FIELDS = {"lora_rank": 0, "drop_prob": 0.0, "drop_max": 0.9}


def fingerprint(tc: TrainConfig) -> str:
  d = {k: v for k, v in tc.to_dict().items() if _LATER_FIELDS.get(k, object()) != v}
  return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# ---- model ---------------------------------------------------------------------------------------

def model_config(tc: TrainConfig, tok, text: LlamaConfig | None = None) -> LlavaConfig:
  """The LlavaConfig trained: the decoder is built from `tc`, or is `text` (a frozen LLM)."""
  size = tc.data.image_size
  vision = ClipVisionConfig(hidden_size=tc.vision_width, intermediate_size=4 * tc.vision_width,
                            num_layers=tc.vision_layers, num_heads=tc.vision_heads,
                            image_size=size, patch_size=tc.patch_size)
  if text is None:
    w, h = tc.text_width, tc.text_heads
    text = LlamaConfig(vocab_size=len(tok), hidden_size=w, intermediate_size=(8 * w) // 3 // 8 * 8,
                       num_layers=tc.text_layers, num_heads=h, num_kv_heads=tc.text_kv_heads,
                       head_dim=w // h, rms_norm_eps=1e-5, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=tc.tie_embeddings,
                       rope_theta=tc.rope_theta)
  elif text.pad_token_id is None:  # padding is masked by id: use the tokenizer's (EOS)
    text = dataclasses.replace(text, pad_token_id=tok.pad_token_id)
  # The last ViT layer feeds the projector: trained from scratch, no layer is "too specific".
  return LlavaConfig(vision=vision, text=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                     vision_feature_layer=-1)


# ---- training ----------------------------------------------------------------------------------

def optimizer(tc: TrainConfig, frozen_llm: bool) -> optax.GradientTransformation:
  """AdamW with clipping over {"params": LLaVA params, "aux": auxiliary head}.

  The decoder (or, frozen, its LoRA adapters) trains at `lr`; the vision tower, projector and
  auxiliary head at `lr * vision_lr_mult`, so the image side is not left behind while the decoder
  fits the answer prior.
  """
  adamw = lambda lr: trainer.adamw(lr, tc.steps, tc.warmup, tc.schedule, tc.b2, tc.weight_decay)
  transforms = {"llm": optax.set_to_zero() if frozen_llm else adamw(tc.lr),
                "vision": adamw(tc.lr * tc.vision_lr_mult), "lora": adamw(tc.lr)}
  labels = lambda t: {"params": {k: ("llm" if k == "llm" else "vision") for k in t["params"]},
                      "aux": "vision", **({"lora": "lora"} if "lora" in t else {})}
  return optax.multi_transform(transforms, labels)


def make_train_step(cfg: LlavaConfig, tc: TrainConfig, digit_ids, tx, frozen_llm: bool = False,
                    n_targets: int | None = None):
  """The jitted, donating step(state, ids, target, key, pixels, cells, dropped) of
  `vlm_task.loss_fn`."""
  return trainer.make_step(lambda train, *batch: vlm_task.loss_fn(cfg, tc, digit_ids, train, *batch,
                                                         frozen_llm, n_targets), tx)


def batch_rows(tc: TrainConfig, step: int, n: int) -> np.ndarray:
  """The training rows of a step: a pure function of (seed, step), so resuming needs no state."""
  return np.random.default_rng([tc.seed, step]).choice(n, tc.batch_size, replace=False)


# ---- data parallelism ----------------------------------------------------------------------------

def cpu_devices(batch_size: int, cores: int | None = None) -> int:
  """How many XLA devices a CPU host is split into for training: two per core, at most the batch,
  and a divisor of it. On 2 cores the default preset's step (batch 8) took 148-153 ms on one
  device, 113 ms on 2, 91-104 ms on 4 and 164 ms on 8 (medians of 40-60 steps, one machine
  at about 247 GFLOP/s, NumPy f32 1024² matmul):
  a device's share of the batch keeps its attention intermediates in cache, and the devices'
  small ops overlap."""
  cores = cores or os.cpu_count() or 1
  return max(d for d in range(1, min(2 * cores, batch_size) + 1) if batch_size % d == 0)


def use_cpu_devices(batch_size: int) -> None:
  """Splits the CPU host into `cpu_devices(batch_size)` devices (`jax_num_cpu_devices`) if JAX has
  not started its backends yet and nothing set a count. Call it first thing in a process that
  will train (`jaxmm train vlm`, `make demo`); it starts no backend. Devices other than the
  first stay idle outside training."""
  if jax.config.jax_num_cpu_devices < 0 and "host_platform_device_count" not in \
      os.environ.get("XLA_FLAGS", ""):
    try:
      jax.config.update("jax_num_cpu_devices", cpu_devices(batch_size))
    except RuntimeError:   # the backends already started: train on the devices there are
      pass


def data_mesh(batch_size: int) -> Mesh | None:
  """A 1-D "data" mesh over as many local devices as divide the batch; None for one device."""
  devices = jax.local_devices()
  n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
  return Mesh(np.array(devices[:n]), ("data",)) if n > 1 else None


# ---- a run ---------------------------------------------------------------------------------------

def _tokenizer_and_llm(tc: TrainConfig, llm_dir):
  """(tokenizer, frozen LLM model or None). A word tokenizer unless an LLM folder is given."""
  if llm_dir is None:
    return word_tokenizer(digits_vqa.words(tc.data)), None
  from transformers import AutoTokenizer
  m = api.load(llm_dir)
  if m.family != "llama":
    raise JaxmmError(f"--llm needs a converted llama model, {llm_dir} holds {m.family!r}")
  try:
    tok = AutoTokenizer.from_pretrained(llm_dir)
  except (OSError, ValueError) as e:
    raise JaxmmError(f"--llm {llm_dir}: no loadable tokenizer ({e})") from None
  tok.add_tokens(["<image>"], special_tokens=True)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok, m


def validate(tc: TrainConfig, cfg: LlavaConfig, frozen_llm: bool = False) -> None:
  """Refuses a configuration the losses cannot be computed for, naming the setting."""
  side = tc.data.image_size // tc.patch_size
  if tc.data.image_size % tc.patch_size or side % tc.data.grid:
    raise JaxmmError(f"grid cells must align with patches: image {tc.data.image_size} px, patch "
                     f"{tc.patch_size}, grid {tc.data.grid}")
  if tc.aux_pool not in ("cell", "token", "ink"):
    raise JaxmmError(f"aux_pool must be 'cell', 'token' or 'ink', got {tc.aux_pool!r}")
  n = cfg.text.num_layers
  for name, on, layer in (("probe", tc.probe_weight, tc.probe_layer),
                          ("ground", tc.ground_weight, tc.ground_layer),
                          ("early", tc.early_weight, tc.early_layer)):
    if on and not 1 <= layer < n:
      raise JaxmmError(f"{name}_layer must be in 1..{n - 1} (it reads a layer's input), got {layer}")
  if not (0.0 <= tc.drop_prob <= 1.0 and 0.0 <= tc.drop_max <= 1.0):
    raise JaxmmError(f"drop_prob and drop_max must lie in [0, 1], got {tc.drop_prob} and "
                     f"{tc.drop_max}")
  if tc.count_head not in ("", "histogram"):
    raise JaxmmError(f"count_head must be '' or 'histogram', got {tc.count_head!r}")
  if tc.ground_weight and tc.count_head and cfg.text.num_heads < 2:
    raise JaxmmError("ground_weight needs >= 2 decoder heads (a lookup and a counting head)")
  if tc.lora_rank < 0 or (tc.lora_rank and not frozen_llm):
    raise JaxmmError(f"lora_rank {tc.lora_rank}: LoRA adapts a frozen decoder; give --llm "
                     "(a decoder trained from scratch trains all its weights)")


class Run:
  """One training run: data, model, optimiser; `state` is the checkpointed pytree.

  Data parallel over `data_mesh`: the state is replicated on its devices and each step's batch
  split between them (the same step as on one device, summed in another order).
  """

  def __init__(self, tc: TrainConfig, llm_dir=None):
    self.tc = tc
    self.tok, llm = _tokenizer_and_llm(tc, llm_dir)
    self.frozen_llm = llm is not None
    self.cfg = model_config(tc, self.tok, llm.config if llm else None)
    validate(tc, self.cfg, self.frozen_llm)
    images, items, cells = digits_vqa.training_set(tc.data, tc.train_images, tc.seed,
                                                   tc.turns_per_category, with_labels=True)
    self.images = images   # uint8; `pixels` normalises a batch's (all at once: 1.8 GB, 10 s)
    self.cells = cells.reshape(len(cells), -1)
    enc = vlm_task.Encoder(self.tok, self.cfg.num_image_tokens, self.cfg.image_token_id)
    self.ids, self.target, self.key = vlm_task.encode_training_set(enc, items, tc.seed,
                                                          self.tok.pad_token_id, tc.data.grid)
    # The first of a split (the aux head once drew the second): the measured runs' init.
    key = jax.random.split(jax.random.key(tc.seed))[0]
    # One compiled program instead of ~180 eager ones (9 s on 2 cores). A frozen LLM's params
    # stay outside it (passing them through would copy them); `{}` holds their place.
    init = jax.jit(lambda k: llava.init_params(self.cfg, k, tc.pos_init, llm={} if llm else None))
    params = init(key) | ({"llm": llm.params} if llm else {})
    train = {"params": params, "aux": vlm_task.init_aux_head(self.cfg, tc)}
    if tc.lora_rank:
      train["lora"] = init_lora(params["llm"]["layers"], tc.lora_rank, jax.random.key(tc.seed + 1))
    tx = optimizer(tc, self.frozen_llm)
    self.mesh = data_mesh(tc.batch_size)
    self.state = self._place({**train, "opt_state": tx.init(train)}, PartitionSpec())
    self.digit_ids = tuple(self.tok.convert_tokens_to_ids([str(d) for d in range(10)]))
    n_targets = int(self.target[:, 1:].sum(1).max())
    self.train_step = make_train_step(self.cfg, tc, self.digit_ids, tx, self.frozen_llm, n_targets)

  def _place(self, tree, spec: PartitionSpec):
    return tree if self.mesh is None else jax.device_put(tree, NamedSharding(self.mesh, spec))

  def pixels(self, rows) -> np.ndarray:
    """f32[len(rows), 3, H, W]: those training images as the processor preprocesses them."""
    return vlm_task.pixel_values(self.images[rows])

  def step(self, step: int) -> dict:
    rows = batch_rows(self.tc, step, len(self.ids))
    pixels = self.pixels(rows)
    dropped = vlm_task.drop_blank(self.tc, np.random.default_rng([self.tc.seed, step, 1]),
                                  self.ids[rows], pixels, self.cfg.image_token_id)
    batch = self._place((self.ids[rows], self.target[rows], self.key[rows], pixels,
                         self.cells[rows], dropped), PartitionSpec("data"))
    self.state, loss, metrics = self.train_step(self.state, *batch)
    return {"step": step, "loss": float(loss), **{k: float(v) for k, v in metrics.items()}}

  def save_model(self, out: Path) -> Path:
    """The converted-format folder, with the tokenizer and processor files beside the params."""
    proc = llava_processor(self.tok, self.cfg.vision.image_size, self.cfg.vision.patch_size)
    with tempfile.TemporaryDirectory(prefix="jaxmm-vlm-proc-") as tmp:
      proc.save_pretrained(tmp)
      files = sorted(Path(tmp).iterdir())
      params = jax.device_get(self.state["params"])
      if "lora" in self.state:  # the saved decoder is the adapted one: a plain llama
        llm = params["llm"]
        params["llm"] = {**llm, "layers": jax.device_get(lora_merge(llm["layers"],
                                                                    self.state["lora"]))}
      return checkpoint.save_model(out, "llava", self.cfg.to_dict(), params, files, overwrite=True)


def _check_same_config(out: Path, tc: TrainConfig, llm_dir) -> None:
  """A resumed run must continue the same configuration."""
  trainer.check_same_config(out, {"config": tc.to_dict(),
                                  "llm": str(llm_dir) if llm_dir else None})


def train(tc: TrainConfig, out, llm_dir=None, kill_at_step=None, progress=True) -> Path:
  """Trains (resuming from OUT/ckpt when present) and writes OUT/model; returns that folder."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  _check_same_config(out, tc, llm_dir)
  r = Run(tc, llm_dir)
  if r.mesh is not None and progress:
    print(f"data parallel over {r.mesh.size} {jax.default_backend()} devices", flush=True)
  trainer.fit(r, out, tc.steps, tc.ckpt_every, tc.log_every, "train vlm",
              ("loss", "answer_token_acc"), kill_at_step, progress)
  return r.save_model(out / "model")


def ensure_model(cache_dir, tc: TrainConfig | None = None, progress=True) -> Path:
  """The model folder for `tc` (default preset) under `cache_dir`, trained when not cached.

  The folder name carries a fingerprint of the config, so a changed preset retrains.
  """
  tc = tc or default()
  out = Path(cache_dir) / f"digits-vlm-{fingerprint(tc)}"
  model = out / "model"
  if (model / checkpoint.META).is_file():
    return model
  return train(tc, out, progress=progress)


# ---- command line --------------------------------------------------------------------------------

_OVERRIDES = ("steps", "batch_size", "lr", "warmup", "seed", "ckpt_every", "train_images",
              "turns_per_category", "lora_rank", "drop_prob", "drop_max",
              "text_layers", "text_width", "vision_layers", "vision_width")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", required=True, help="run folder (ckpt/, log.jsonl, model/)")
  p.add_argument("--preset", choices=sorted(PRESETS), default="default")
  p.add_argument("--llm", help="converted llama folder used as a frozen decoder (e.g. SmolLM2)")
  for name in _OVERRIDES:
    kind = float if name in ("lr", "drop_prob", "drop_max") else int
    p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"override the preset's {name}")
  # Test hook: SIGKILL this process right after that step.
  p.add_argument("--kill-at-step", type=int, help=argparse.SUPPRESS)


def config_from_args(args) -> TrainConfig:
  tc = PRESETS[args.preset]()
  over = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
  return dataclasses.replace(tc, **over)


def run(args) -> int:
  tc = config_from_args(args)
  use_cpu_devices(tc.batch_size)
  model = train(tc, args.out, args.llm, args.kill_at_step)
  print(f"wrote {model}")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
