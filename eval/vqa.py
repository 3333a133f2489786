"""Answer a LLaVA-format question file with a jaxmm vision-language model, and score it.

  jaxmm eval vqa --model M --questions Q.jsonl --image-folder DIR --answers-file OUT.jsonl
                 [--schedule S] [--answer-key KEY.jsonl] [--batch-size N] [--out SCORES.json]

M is any vision-language family (LLaVA, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL). Questions are
LLaVA's `model_vqa_loader` input (`question_id`, `image`, `text`, optional `category`); answers
are written in LLaVA's answers-file format (`question_id`, `prompt`, `text`, `answer_id`,
`model_id`). Prompts go through the model's own chat template and processor
(`jaxmm.data.prompts`), whose outputs go whole to `jaxmm.generate`; batches have a fixed size
and are left padded to their longest prompt rounded up to a multiple of 8, so the jitted
prefill and decode loop compile once per padded length (and, for the families whose image
shapes vary, per image-shape bucket). With an answer key (`question_id`, `answer`), exact match
(after `jaxmm.data.vqa.normalize`) is scored per category; a question whose image is missing or
unreadable is reported by id, gets no answer line, and counts as wrong.
"""
import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import jax
from tqdm import tqdm

import jaxmm.cli
from jaxmm import api, checkpoint, registry, sharding
from jaxmm.data import prompts, vqa
from jaxmm.errors import InputError
from jaxmm.pruning import schedule as schedule_lib


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="jaxmm vision-language model folder "
                 "(converted or trained)")
  p.add_argument("--questions", required=True, help="LLaVA-format question JSONL")
  p.add_argument("--image-folder", required=True, help="folder the `image` fields are relative to")
  p.add_argument("--answers-file", required=True, help="where the LLaVA answers JSONL goes")
  p.add_argument("--answer-key", help="JSONL of {question_id, answer[, category]} to score against")
  p.add_argument("--schedule", help="pruning schedule, e.g. 'divprune@0:33%%'")
  p.add_argument("--positions", choices=("preserve", "compact"),
                 help="position ids of the kept tokens in every stage (default: each method's own)")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--max-new-tokens", type=int, default=8)
  p.add_argument("--out", help="write the scores as JSON here")
  sharding.add_args(p)
  p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0, with "
                 "--num-processes and --process-id (jax.distributed.initialize); each process "
                 "answers every N-th question and process 0 writes the merged answers file")
  p.add_argument("--num-processes", type=int, help="multi-host: how many processes")
  p.add_argument("--process-id", type=int, help="multi-host: this process's index")


def init_distributed(args) -> None:
  """`jax.distributed.initialize` from the multi-host flags (nothing without them)."""
  given = [args.coordinator, args.num_processes, args.process_id]
  if all(v is None for v in given):
    return
  if any(v is None for v in given):
    raise InputError("--coordinator, --num-processes and --process-id go together")
  if not 0 <= args.process_id < args.num_processes:
    raise InputError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts need a transport
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id)


def parse_schedule(text, positions=None):
  """The pruning schedule of `--schedule` (None: no pruning), `positions` overriding the
  methods' defaults."""
  if text is None:
    if positions is not None:
      raise InputError("--positions needs --schedule")
    return None
  return schedule_lib.parse(text, positions=positions)


def load_image(path: Path):
  """An RGB PIL image, or the reason it cannot be read."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return im.convert("RGB"), None
  except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
    return None, f"cannot read image {path}: {type(e).__name__}: {e}"


def require_images(m, command: str) -> None:
  """A one-line error unless the model's family takes images."""
  if not registry.takes_images(m.family):
    raise InputError(f"{command} needs a vision-language model (one that takes images); "
                     f"{m.path} is a {m.family!r} model")


def _pad_rows(xs, n: int):
  """Repeats the last row so every batch has the same size (one compiled shape)."""
  return list(xs) + [xs[-1]] * (n - len(xs))


def answer_all(model, rows, image_folder, schedule=None, batch_size=16, max_new_tokens=8,
               progress=True, seed=0, ids=None):
  """Generates answers. Returns (answer lines, errors [{question_id, error}], timing dict).
  `seed` drives random pruning (`jaxmm.generation.generate`); each question draws from its own
  example id, `ids[i]` (default: its row number), so its answer does not depend on the batch
  it falls in, nor on which process answers it."""
  ids = list(range(len(rows))) if ids is None else list(ids)
  index = {r["question_id"]: i for r, i in zip(rows, ids)}
  pr = prompts.Prompter(model.path)
  texts = {r["question_id"]: pr.text(r["text"]) for r in rows}
  kw = {} if schedule is None else {"schedule": schedule}
  lines, errors, times = [], [], []
  bar = tqdm(total=len(rows), desc="eval vqa", unit="q", disable=not progress)
  for i in range(0, len(rows), batch_size):
    chunk, images = [], []
    for r in rows[i:i + batch_size]:
      img, err = load_image(Path(image_folder) / str(r["image"]))
      if err:
        errors.append({"question_id": r["question_id"], "error": err})
        print(f"question {r['question_id']}: {err}", file=sys.stderr)
      else:
        chunk.append(r)
        images.append(img)
    bar.update(len(rows[i:i + batch_size]))
    if not chunk:
      continue
    inputs = pr.inputs(_pad_rows(images, batch_size),
                       _pad_rows([texts[r["question_id"]] for r in chunk], batch_size))
    example_ids = _pad_rows([index[r["question_id"]] for r in chunk], batch_size)
    t0 = time.perf_counter()
    new = api.generate(model, max_new_tokens=max_new_tokens, seed=seed, example_ids=example_ids,
                       **inputs, **kw)
    times.append(time.perf_counter() - t0)
    for r, out in zip(chunk, pr.tok.batch_decode(new[:len(chunk)], skip_special_tokens=True)):
      lines.append({"question_id": r["question_id"], "prompt": r["text"], "text": out.strip(),
                    "answer_id": _answer_id(model, r["question_id"], schedule, seed),
                    "model_id": Path(model.path).name})
  bar.close()
  timing = {"generate_s": sum(times), "first_batch_s": times[0] if times else 0.0,
            "after_first_batch_s": sum(times[1:]), "batches": len(times)}
  return lines, errors, timing


def _answer_id(model, question_id, schedule, seed) -> str:
  """A stable id of one answer (the same run gives the same file, on any number of processes)."""
  sched = ",".join(map(str, schedule)) if schedule else ""
  return uuid.uuid5(uuid.NAMESPACE_URL, f"jaxmm:{Path(model.path).name}:{question_id}:{sched}:"
                    f"{seed}").hex


def _shard_rows(rows) -> tuple[list, list]:
  """(this process's questions, their row numbers): every process_count-th question from the
  process's index. One process: all of them."""
  n, i = jax.process_count(), jax.process_index()
  ids = list(range(i, len(rows), n))
  return [rows[j] for j in ids], ids


def _merge(answers_file, lines, errors, rows) -> tuple[list, list]:
  """Multi-host: every process writes its answers beside `answers_file`; after a barrier the
  first process merges them in question order (the single-process file) and removes the
  parts. Returns (all lines, all errors) on the first process, its own on the others."""
  from jax.experimental import multihost_utils
  me, n = jax.process_index(), jax.process_count()
  parts = [Path(f"{answers_file}.part{i}of{n}") for i in range(n)]
  checkpoint.write_json(parts[me], {"lines": lines, "errors": errors})
  multihost_utils.sync_global_devices("jaxmm eval vqa: answers written")
  if me == 0:
    row = {r["question_id"]: j for j, r in enumerate(rows)}
    got = [json.loads(p.read_text()) for p in parts]
    lines = sorted((x for g in got for x in g["lines"]), key=lambda x: row[x["question_id"]])
    errors = sorted((x for g in got for x in g["errors"]), key=lambda x: row[x["question_id"]])
    vqa.write_jsonl(answers_file, lines)
    for p in parts:
      p.unlink()
  multihost_utils.sync_global_devices("jaxmm eval vqa: answers merged")
  return lines, errors


def score(lines, rows, key: dict) -> dict:
  """Exact-match accuracy overall and per category; unanswered keyed questions count as wrong."""
  got = {l["question_id"]: l["text"] for l in lines}
  cats = {r["question_id"]: r.get("category") for r in rows}
  right, total = {}, {}
  for qid, k in key.items():
    if qid not in cats:
      continue
    cat = k.get("category") or cats[qid] or "all"
    ok = qid in got and vqa.normalize(got[qid]) == vqa.normalize(str(k["answer"]))
    right[cat] = right.get(cat, 0) + ok
    total[cat] = total.get(cat, 0) + 1
  n = sum(total.values())
  return {"overall": sum(right.values()) / n if n else float("nan"),
          "per_category": {c: right[c] / total[c] for c in sorted(total)},
          "counts": dict(sorted(total.items()))}


def evaluate(model, questions, image_folder, answer_key=None, schedule=None, batch_size=16,
             answers_file=None, max_new_tokens=8, progress=True, seed=0, mesh=None,
             sharding_preset="fsdp") -> dict:
  """Answers (and scores) a question file. `model` is a folder or a loaded `jaxmm.Model`;
  `schedule` a text form or parsed schedule; `seed` drives random pruning; `mesh`: load a
  folder onto it (`jaxmm.load`). Returns accuracy (when keyed), errors and timing."""
  m = model if isinstance(model, api.Model) else api.load(model, mesh=mesh,
                                                          sharding=sharding_preset)
  require_images(m, "eval vqa")
  if batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {batch_size}")
  rows = vqa.read_questions(questions)
  key = vqa.read_answer_key(answer_key) if answer_key else None
  sched = parse_schedule(schedule) if isinstance(schedule, str) else schedule
  t0 = time.perf_counter()
  mine, ids = _shard_rows(rows)
  lines, errors, timing = answer_all(m, mine, image_folder, sched, batch_size, max_new_tokens,
                                     progress, seed, ids)
  timing["total_s"] = time.perf_counter() - t0
  if jax.process_count() > 1:
    if not answers_file:
      raise InputError("multi-process eval vqa needs an answers file to merge into")
    lines, errors = _merge(answers_file, lines, errors, rows)
  elif answers_file:
    vqa.write_jsonl(answers_file, lines)
  res = {"model": str(m.path), "schedule": schedule if isinstance(schedule, str) else None,
         "questions": len(rows), "answered": len(lines), "errors": errors, "timing": timing}
  if key is not None:
    res.update(score(lines, rows, key))
  return res


def print_scores(res: dict) -> None:
  print(f"answered {res['answered']}/{res['questions']} questions "
        f"in {res['timing']['total_s']:.1f}s ({len(res['errors'])} unreadable)")
  if "overall" in res:
    for cat, acc in res["per_category"].items():
      print(f"  {cat:<12} {100 * acc:6.2f}%  (n={res['counts'][cat]})")
    print(f"  {'overall':<12} {100 * res['overall']:6.2f}%")


def run(args) -> int:
  sched = parse_schedule(args.schedule, args.positions)
  init_distributed(args)
  res = evaluate(args.model, args.questions, args.image_folder, args.answer_key, sched,
                 args.batch_size, args.answers_file, args.max_new_tokens,
                 mesh=sharding.mesh_from_args(args), sharding_preset=args.sharding)
  if jax.process_index() > 0:
    return 0                     # process 0 reports the merged run
  res["schedule"] = args.schedule
  res["positions"] = args.positions
  print_scores(res)
  if args.out:
    checkpoint.write_json(args.out, res)
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
