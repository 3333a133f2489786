"""jaxmm as a model of the lmms-eval harness: `python -m lmms_eval --model jaxmm ...`.

  python -m lmms_eval --model jaxmm \
      --model_args "pretrained=MODEL,schedule='divprune@0:71,random@5:9',batch_size=16" \
      --include_path TASKS --tasks digits_vqa --output_path OUT

The model is registered through the entry-point group `lmms_eval.models` (`jaxmm.eval.
lmms_plugin`). model_args, any other key being an error:
  pretrained      a jaxmm model folder of any vision-language family (`jaxmm convert`, training)
  schedule        a pruning schedule (METHOD@LAYER:KEEP[,...]) or @FILE.json; model_args are
                  split at commas, so quote one with several stages: schedule='a@0:9,b@5:3'
  positions       preserve | compact: every stage's position ids (default: each method's own)
  batch_size      requests per batch (default: lmms-eval's --batch_size)
  max_new_tokens  the decoding limit of every request (default: the task's generation_kwargs,
                  else 32)
  dtype           float32 | bfloat16 | float16: the params are cast to it
  seed            random pruning draws from fold_in(PRNGKey(seed), doc_id) (default 0)

Requests keep their given order and go through the folder's own chat template and processor
(`jaxmm.data.prompts.Prompter`) in batches of a fixed size (the last one filled by repeating its
last request), left padded to the longest prompt rounded up to a multiple of 8, as `jaxmm eval
vqa` batches a question file: a question answers the same in both, and the jitted prefill and
decode loop compile once per padded length. Decoding is greedy (a task's temperature is not
used); the text is cut at the task's first `until` string. lmms-eval's `<image>` placeholders
are dropped from a context: the chat template places the images.

Efficiency: when the run ends (`clean`) one record goes to lmms-eval's throughput log, so the
results file holds it under "throughput", each key prefixed "avg_" by lmms-eval (one record:
the value itself). Per request, from its own text length and the kept counts its prefill
returned: `prefill_flops` (decoder layers, `jaxmm.flops` convention B), `prefill_flops_gqa`
(the exact GQA form), `prefill_flops_unpruned` (B, the same request unpruned), `visual_tokens`
(at the LLM input) and `visual_per_layer` ((1/L) Σ_l N_vis(l)), averaged over the requests;
per batch: `prefill_batch_median_s` and `decode_token_median_s` (the jitted prefill, and the
decode loop's time per generated token, medians over the batches that compiled nothing),
`loglikelihood_batch_median_s` (the forward of loglikelihood batches), `kv_cache_bytes` (the
largest batch's KV cache as allocated: every segment's keys and values, prompt plus
max_new_tokens slots) and `kv_cache_bytes_per_request`; `compiles` (XLA compiles during the
requests) and `batch_size`.
"""
import dataclasses
import statistics
import time

import jax
import numpy as np
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger

from jaxmm import api, flops, generation
from jaxmm import inputs as inputs_lib
from jaxmm.data import prompts
from jaxmm.errors import InputError
from jaxmm.eval import vqa as eval_vqa
from jaxmm.models import core
from jaxmm.pruning import schedule as schedule_lib

MODEL_ARGS = ("pretrained", "schedule", "positions", "batch_size", "max_new_tokens", "dtype",
              "seed")
# lmms-eval's command line passes these to every model; jaxmm runs on JAX's default device.
HARNESS_ARGS = ("device", "max_batch_size")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_NEW_TOKENS = 32
IMAGE_TAG = "<image>"
# jax.monitoring's event for one XLA compile (jax._src.dispatch.BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _count_compile(event: str, duration: float, **kwargs) -> None:
  if event == COMPILE_EVENT:
    _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


# ---- model_args -------------------------------------------------------------------------------

def _unquote(value):
  """A model_args string without the quotes that kept its commas together."""
  if isinstance(value, str) and len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
    return value[1:-1]
  return value


def _whole(name: str, value, minimum: int) -> int:
  """An integer model arg (lmms-eval passes numbers as int or str)."""
  if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < minimum:
    raise InputError(f"jaxmm model_args {name} must be a whole number >= {minimum}, got {value!r}")
  return int(value)


def parse_schedule(text, positions):
  """The parsed schedule (() without one); `positions` overrides every stage's."""
  if text is None:
    if positions is not None:
      raise InputError("jaxmm model_args positions= needs schedule=")
    return ()
  return schedule_lib.parse(str(_unquote(text)), positions=positions)


def parse_model_args(arg_string: str) -> dict:
  """model_args as lmms-eval parses them (KEY=VALUE at commas outside quotes), known keys only."""
  try:
    args = lmms_utils.simple_parse_args_string(arg_string or "")
  except ValueError:
    raise InputError(f"jaxmm model_args {arg_string!r} are not KEY=VALUE pairs; quote a value "
                     "that holds commas, e.g. schedule='divprune@0:71,random@5:9'") from None
  unknown = sorted(set(args) - set(MODEL_ARGS))
  if unknown:
    raise InputError(f"unknown jaxmm model_args key(s) {', '.join(unknown)}; known: "
                     f"{', '.join(MODEL_ARGS)}")
  return args


# ---- requests -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prompt:
  """One request as the model takes it: its images, chat-templated text and example id."""
  images: tuple
  text: str
  example_id: int


def images_of(visuals) -> tuple:
  """The RGB images of a doc_to_visual result (a list, possibly nested one level)."""
  from PIL import Image
  flat = []
  for v in visuals or ():
    flat.extend(v if isinstance(v, (list, tuple)) else [v])
  for v in flat:
    if not isinstance(v, Image.Image):
      raise InputError(f"jaxmm takes images; the task gave a {type(v).__name__} visual")
  return tuple(v.convert("RGB") for v in flat)


def cut(text: str, until) -> str:
  """The text before the first stop string, stripped (as `jaxmm eval vqa` strips answers)."""
  stops = [until] if isinstance(until, str) else list(until or ())
  for s in stops:
    if s and s in text:
      text = text[:text.index(s)]
  return text.strip()


def visual_per_layer(sched, kept, b: int, n_visual: int, num_layers: int) -> list[int]:
  """N_vis(l), l = 0..L-1, of example b from the kept indices (i32[B, k], -1 padded) its
  prefill returned: the counts it actually ran with."""
  counts = [int((np.asarray(k)[b] >= 0).sum()) for k in kept]
  stages = tuple(dataclasses.replace(st, keep=c) for st, c in zip(sched, counts))
  return schedule_lib.visual_per_layer(stages, num_layers, n_visual)


# ---- efficiency ----------------------------------------------------------------------------

@dataclasses.dataclass
class Efficiency:
  """What a run measured: per request (FLOPs, visual tokens) and per batch (times, KV bytes)."""
  dims: flops.Dims
  batch_size: int
  per_request: dict = dataclasses.field(default_factory=dict)   # name -> [value per request]
  per_batch: dict = dataclasses.field(default_factory=dict)     # name -> [value per batch]
  generated_tokens: int = 0
  generate_s: float = 0.0
  compiles: int = 0

  def add(self, table: dict, **values) -> None:
    for k, v in values.items():
      (self.per_request if table == "request" else self.per_batch).setdefault(k, []).append(v)

  def add_prefill(self, prepared, sched, kept, n: int) -> None:
    """The first n examples of a batch: FLOPs and visual tokens from their own counts."""
    for b in range(n):
      vis = visual_per_layer(sched, kept, b, int(prepared.visual_B[b]), self.dims.num_layers)
      ns = [int(prepared.text_B[b]) + v for v in vis]
      full = [int(prepared.text_B[b]) + int(prepared.visual_B[b])] * self.dims.num_layers
      self.add("request", prefill_flops=sum(flops.layer_flops(x, self.dims, "B") for x in ns),
               prefill_flops_gqa=sum(flops.layer_flops(x, self.dims, "gqa") for x in ns),
               prefill_flops_unpruned=sum(flops.layer_flops(x, self.dims, "B") for x in full),
               visual_tokens=int(prepared.visual_B[b]), visual_per_layer=float(np.mean(vis)))

  def record(self) -> dict:
    """The run's record: per-request means, per-batch medians (numbers only)."""
    rec = {k: float(np.mean(v)) for k, v in self.per_request.items()}
    for k in ("prefill_batch_s", "decode_token_s", "loglikelihood_batch_s"):
      if self.per_batch.get(k):
        rec[k[:-len("_s")] + "_median_s"] = statistics.median(self.per_batch[k])
    if self.per_batch.get("kv_cache_bytes"):
      kv = self.per_batch["kv_cache_bytes"]
      rec.update(kv_cache_bytes=max(kv),
                 kv_cache_bytes_per_request=float(np.mean(kv)) / self.batch_size)
    rec.update(requests=len(self.per_request.get("prefill_flops", ())), compiles=self.compiles,
               batch_size=self.batch_size)
    return rec


# ---- the model -------------------------------------------------------------------------------

class Jaxmm(lmms):
  """A jaxmm vision-language model folder under lmms-eval (see the module docstring)."""

  def __init__(self, pretrained=None, schedule=None, positions=None, batch_size=1,
               max_new_tokens=None, dtype=None, seed=0, device=None, max_batch_size=None):
    super().__init__()
    if pretrained is None:
      raise InputError("jaxmm model_args need pretrained=FOLDER (a jaxmm model folder)")
    if dtype is not None and dtype not in DTYPES:
      raise InputError(f"jaxmm model_args dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    self.schedule = parse_schedule(schedule, positions)
    self.batch_size = _whole("batch_size", batch_size, 1)
    self.max_new_tokens = None if max_new_tokens is None else _whole("max_new_tokens",
                                                                     max_new_tokens, 1)
    self.seed = _whole("seed", seed, 0)
    self.model = api.load(str(pretrained), dtype=dtype)
    eval_vqa.require_images(self.model, "lmms-eval --model jaxmm")
    self.prompter = prompts.Prompter(self.model.path)
    self.stats = Efficiency(flops.Dims.from_config(self.model.config), self.batch_size)
    self._warned = set()
    self._compiles_at_start = _compiles[0]

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    """model_args (checked: `parse_model_args`) over lmms-eval's own arguments (--batch_size,
    --device, ...), which fill what model_args leave out."""
    args = parse_model_args(arg_string)
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in args and k in MODEL_ARGS + HARNESS_ARGS}
    return cls(**args, **extra)

  # -- prompts and batches

  def _prompt(self, images: tuple, context: str, example_id) -> Prompt:
    """The chat-templated prompt: one image as `jaxmm eval vqa` words it, else the same user
    turn with every image first."""
    context = context.replace(IMAGE_TAG, "")
    if len(images) == 1:
      return Prompt(images, self.prompter.text(context), int(example_id))
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": context}]
    text = self.prompter.proc.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True)
    return Prompt(images, text, int(example_id))

  def _doc(self, task, split, doc_id):
    return self.task_dict[task][split][doc_id]

  def _inputs(self, batch: list) -> tuple[dict, list]:
    """(the processor's left-padded arrays, example ids) of a batch filled to batch_size."""
    rows = eval_vqa._pad_rows(batch, self.batch_size)
    inputs = self.prompter.inputs([im for p in rows for im in p.images], [p.text for p in rows])
    return inputs, [p.example_id for p in rows]

  def _max_new(self, gen_kwargs: dict) -> int:
    if gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0:
      self._warn("jaxmm decodes greedily: the task's sampling settings are not used")
    if self.max_new_tokens is not None:
      return self.max_new_tokens
    return _whole("max_new_tokens", gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), 1)

  def _warn(self, message: str) -> None:
    if message not in self._warned:
      self._warned.add(message)
      logger.warning(message)

  # -- generation

  def _generate(self, batch: list, max_new: int) -> tuple[np.ndarray, np.ndarray]:
    """(new tokens i32[n, steps], valid prompt tokens i32[n]) of n prompts: `jaxmm.generate`'s
    prefill and decode loop (`jaxmm.generation`), each timed."""
    m = self.model
    inputs, ids = self._inputs(batch)
    prepared = core.prepare(m.family, m.config, inputs)
    sched = core.resolve(m.family, m.config, prepared, self.schedule)
    keys = inputs_lib.example_keys(self.seed, len(ids), ids)
    c0, t0 = _compiles[0], time.perf_counter()
    logits, segs, kept = jax.block_until_ready(generation._prefill(
        m.family, m.config, m.params, prepared.arrays, keys, sched, max_new))
    c1, t1 = _compiles[0], time.perf_counter()
    dec, dp = core.decoder_of(m.family, m.config, m.params)
    out, steps = jax.block_until_ready(generation._decode(dec, dp, logits, segs, max_new))
    c2, t2, steps = _compiles[0], time.perf_counter(), int(steps)
    self.stats.add_prefill(prepared, sched, kept, len(batch))
    self.stats.add("batch", kv_cache_bytes=sum(x.nbytes for s in segs for x in s.kv))
    if c1 == c0:
      self.stats.add("batch", prefill_batch_s=t1 - t0)
    if c2 == c1 and steps > 1:
      self.stats.add("batch", decode_token_s=(t2 - t1) / (steps - 1))
    self.stats.generate_s += t2 - t0
    valid = np.asarray(inputs["attention_mask"]).sum(axis=1)
    return np.asarray(out)[:len(batch), :steps], valid[:len(batch)]

  def _answer(self, jobs: list) -> dict:
    """{key: GenerationResult} of jobs (key, Prompt, gen_kwargs): batched in order within each
    decoding limit."""
    groups = {}
    for job in jobs:
      groups.setdefault(self._max_new(job[2]), []).append(job)
    tok, out = self.prompter.tok, {}
    for max_new, group in groups.items():
      for s in range(0, len(group), self.batch_size):
        chunk = group[s:s + self.batch_size]
        new, valid = self._generate([p for _, p, _ in chunk], max_new)
        for (key, _, kw), toks, n_in in zip(chunk, new, valid):
          n_out = int(sum(t not in tok.all_special_ids for t in toks.tolist()))
          self.stats.generated_tokens += n_out
          out[key] = GenerationResult(cut(tok.decode(toks, skip_special_tokens=True),
                                          kw.get("until")),
                                      TokenCounts(input_tokens=int(n_in), output_tokens=n_out))
    return out

  def generate_until(self, requests) -> list:
    """Per request (context, gen_kwargs, doc_to_visual, doc_id, task, split): its answer."""
    jobs = []
    for i, r in enumerate(requests):
      context, kw, doc_to_visual, doc_id, task, split = r.args
      images = images_of(doc_to_visual(self._doc(task, split, doc_id)))
      jobs.append((i, self._prompt(images, context, doc_id), dict(kw or {})))
    out = self._answer(jobs)
    return [out[i] for i in range(len(requests))]

  def generate_until_multi_round(self, requests) -> list:
    """Per request (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split): its
    answer per round. After each round the task's doc_to_text(doc, previous_output=answers so
    far, round_idx, previous_round_info) returns (visuals, context, done, answers, info)."""
    state = {}
    for i, r in enumerate(requests):
      context, kw, doc_to_visual, doc_to_text, doc_id, task, split = r.args
      doc = self._doc(task, split, doc_id)
      state[i] = {"doc": doc, "next": doc_to_text, "id": doc_id, "kw": dict(kw or {}),
                  "prompt": self._prompt(images_of(doc_to_visual(doc)), context, doc_id),
                  "answers": [], "info": None}
    active, round_idx = list(state), 0
    while active:
      got = self._answer([(i, state[i]["prompt"], state[i]["kw"]) for i in active])
      round_idx += 1
      active = [i for i in active if self._next_round(state[i], got[i].text, round_idx)]
    return [state[i]["answers"] for i in range(len(requests))]

  def _next_round(self, st: dict, answer: str, round_idx: int) -> bool:
    """Records a round's answer and asks the task for the next; False when it is done."""
    st["answers"].append(answer)
    visuals, context, done, answers, st["info"] = st["next"](
        st["doc"], previous_output=list(st["answers"]), round_idx=round_idx,
        previous_round_info=st["info"])
    if answers is not None:
      st["answers"] = list(answers)
    if not done:
      st["prompt"] = self._prompt(images_of(visuals), context, st["id"])
    return not done

  # -- loglikelihood

  def loglikelihood(self, requests) -> list:
    """Per request (context, continuation or doc_to_target, doc_to_visual, doc_id, task,
    split): (Σ log p(continuation token | prompt and the tokens before it), whether every
    continuation token is the argmax), from `jaxmm.forward` logits under the schedule."""
    out = []
    for s in range(0, len(requests), self.batch_size):
      batch, n_cont = [], []
      for r in requests[s:s + self.batch_size]:
        context, target, doc_to_visual, doc_id, task, split = r.args
        doc = self._doc(task, split, doc_id)
        cont = target if isinstance(target, str) else str(target(doc))
        p = self._prompt(images_of(doc_to_visual(doc)), context, doc_id)
        n_cont.append(self._n_tokens(p.text + cont) - self._n_tokens(p.text))
        batch.append(dataclasses.replace(p, text=p.text + cont))
      out.extend(self._score(batch, n_cont))
    return out

  def _n_tokens(self, text: str) -> int:
    return len(self.prompter.tok(text)["input_ids"])

  def _score(self, batch: list, n_cont: list) -> list:
    """(log-probability, is greedy) of the last n_cont[b] tokens of each prompt."""
    m = self.model
    inputs, ids = self._inputs(batch)
    prepared = core.prepare(m.family, m.config, inputs)
    c0, t0 = _compiles[0], time.perf_counter()
    res = api.forward(m, schedule=self.schedule or None, seed=self.seed, example_ids=ids, **inputs)
    logits = np.asarray(jax.block_until_ready(res.logits))
    if _compiles[0] == c0:
      self.stats.add("batch", loglikelihood_batch_s=time.perf_counter() - t0)
    sched = core.resolve(m.family, m.config, prepared, self.schedule)
    self.stats.add_prefill(prepared, sched, res.kept or (), len(batch))
    seq = np.asarray(inputs["input_ids"])
    t = seq.shape[1]
    origin = (np.broadcast_to(np.arange(t), seq.shape) if res.origin is None
              else np.asarray(res.origin))
    return [continuation_logprob(logits[b], origin[b], seq[b], n) for b, n in enumerate(n_cont)]

  # -- end of run

  def clean(self):
    """Logs the run's efficiency record into lmms-eval's throughput summary, then cleans up."""
    self.stats.compiles = _compiles[0] - self._compiles_at_start
    rec = self.stats.record()
    log_metrics(total_elapsed_time=self.stats.generate_s,
                total_gen_tokens=self.stats.generated_tokens,
                avg_speed=self.stats.generated_tokens / self.stats.generate_s
                if self.stats.generate_s else 0.0, additional_metrics=rec)
    super().clean()


def continuation_logprob(logits_TxV, origin_T, ids_T, n: int) -> tuple[float, bool]:
  """(Σ log softmax, all argmax) of the last n tokens of ids_T, each predicted by the logits
  row whose origin is the position before it (the rows left after pruning keep all text)."""
  t = ids_T.shape[0]
  row_of = np.full(t, -1)
  valid = origin_T >= 0
  row_of[origin_T[valid]] = np.nonzero(valid)[0]
  rows = row_of[t - n - 1:t - 1]
  x = logits_TxV[rows].astype(np.float64)
  target = ids_T[t - n:]
  lse = x.max(axis=-1) + np.log(np.exp(x - x.max(axis=-1, keepdims=True)).sum(axis=-1))
  logp = x[np.arange(n), target] - lse
  return float(logp.sum()), bool((x.argmax(axis=-1) == target).all())
