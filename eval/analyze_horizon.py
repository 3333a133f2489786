"""Information horizon: per layer and question category, how much a lone 2x2 window of visual
tokens still changes the probability of the answer's first token (pruning.md §4.1).

  jaxmm analyze horizon --model M --questions Q.jsonl --image-folder DIR --answer-key KEY
                        --out DIR [--tau 0.05] [--limit N] [--layers 1-4,8,16]

Per question: one captured forward (hidden states entering every layer), then per probe layer
l = 1..L-1 (or those of --layers) one jitted batch over all windows plus the empty set
(`jaxmm.analysis.horizon`). Windows follow each image's own grids, as the model's family lays
its visual tokens out (`visual_grids`): LLaVA's square patch grid, LLaVA-NeXT's base grid and
unpadded tile grid (newlines are in no window), Qwen2-VL's merged grid (h/2, w/2). Per question
the JSON records its grids, windows and the visual tokens in no window (odd edges, newlines); a
question with no 2x2 window is skipped, with its grids named on stderr. A probe at l runs layers
l..L-1, so the whole sweep costs ~L²/2 layers per window; --layers thins it on deep decoders (it
must keep layer 1, the reference).
y* is the first token of the key's answer, tokenized alone. Per layer and category: mean, std
and max of I_l(w) and mean |I_l(w)|; the horizon is the first l with mean |I_l| <= tau * mean |I_1|.
Writes OUT/horizon.json, OUT/horizon_heatmap.png (layer x category) and OUT/horizon_curves.png.
"""
import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import jaxmm.cli
from jaxmm.eval import analyze_common as common
from jaxmm import checkpoint, registry
from jaxmm.analysis import horizon
from jaxmm.analysis.capture import Capture
from jaxmm.data import vqa
from jaxmm.errors import InputError
from jaxmm.models import core


def add_args(p: argparse.ArgumentParser) -> None:
  common.add_common_args(p)
  p.add_argument("--answer-key", required=True, help="JSONL of {question_id, answer[, category]}")
  p.add_argument("--tau", type=float, default=horizon.TAU, help="horizon threshold (default 0.05)")
  p.add_argument("--layers", help="probe layers: 'A-B', 'A,B,C' or a mix ('1-4,8,16'); must "
                 "include 1 (default: every layer 1..L-1)")


def first_token(tok, answer: str) -> int:
  ids = tok(str(answer), add_special_tokens=False)["input_ids"]
  if not ids:
    raise InputError(f"answer {answer!r} tokenizes to nothing")
  return int(ids[0])


def _summary(info_list, layers, tau) -> dict:
  """info_list: f[L', W_q] per question (W_q its own windows) -> per-layer statistics over all
  (question, window) pairs, and the horizon."""
  a = np.concatenate(info_list, axis=1).astype(np.float64)    # [L', Σ_q W_q]
  mean_abs = np.abs(a).mean(axis=1)
  return {"mean": a.mean(axis=1).tolist(), "std": a.std(axis=1).tolist(),
          "max": a.max(axis=1).tolist(), "mean_abs": mean_abs.tolist(),
          "horizon": horizon.horizon_layer(layers, mean_abs, tau), "questions": len(info_list)}


def question_windows(m, inputs) -> tuple[list, np.ndarray]:
  """(grids [[rows, cols], ...], windows i32[W, 4] of sequence slots) of a one-question batch:
  the 2x2 windows of each of its images' grids (the family's `visual_grids`)."""
  grids = registry.family_module(m.family).visual_grids(m.config, inputs)[0]
  return [list(g.shape) for g in grids], horizon.image_windows(grids)


def analyze(m, rows, pr, image_folder, key: dict, tau: float, layers=None) -> dict:
  cfg = m.config
  layers = list(range(1, cfg.text.num_layers)) if layers is None else list(layers)
  if 1 not in layers:
    raise InputError(f"probe layers {layers} must include layer 1: the threshold is relative to it")
  missing = [r["question_id"] for r in rows if r["question_id"] not in key]
  if missing:
    raise InputError(f"answer key has no answer for question(s) {missing[:5]}")
  by_cat, secs, per_q = defaultdict(list), [], []
  decoder = core.decoder_of(m.family, cfg, m.params)
  for r, inputs, out, fwd_s in common.captured(m, rows, pr, image_folder, Capture(hidden=True),
                                               "analyze horizon"):
    t0 = time.perf_counter()
    grids, wins = question_windows(m, inputs)
    visual = np.asarray(out.captured["visual"][0])
    if not len(wins):
      print(f"question {r['question_id']}: skipped, its visual grids {grids} have no 2x2 "
            "window", file=sys.stderr)
      continue
    positions = core.prepare(m.family, cfg, inputs).arrays["position_ids"][0]
    target = first_token(pr.tok, key[r["question_id"]]["answer"])
    info = horizon.information(*decoder, out.captured["hidden"][:, 0], positions,
                               inputs["attention_mask"][0].astype(bool), visual, target, wins,
                               layers)
    secs.append(fwd_s + time.perf_counter() - t0)
    per_q.append({"question_id": r["question_id"], "grids": grids, "windows": len(wins),
                  "visual_tokens": int(visual.sum()),
                  "visual_tokens_in_no_window": int(visual.sum()) - 4 * len(wins)})
    cat = key[r["question_id"]].get("category") or r.get("category") or "all"
    by_cat[cat].append(info)
    if cat != "all":
      by_cat["all"].append(info)
  if not secs:
    raise InputError("no readable question with a 2x2 window of visual tokens")
  return {"model": str(m.path), "layers": layers, "tau": tau,
          "windows": sum(q["windows"] for q in per_q), "per_question": per_q,
          "categories": {c: _summary(v, layers, tau) for c, v in sorted(by_cat.items())},
          "definitions": DEFINITIONS, **common.timing(secs)}


# Which numbers are the paper's and which are jaxmm's own (the reference code has no horizon rule).
DEFINITIONS = {
    "information": "jaxmm's own metric: I_l(w) = p_l(y* | text, w) - p_l(y* | text only), the "
                   "first answer token's probability from one 2x2 window alone at layer l",
    "windows": "the 2x2 blocks, in raster order, of each image's own grids of visual tokens as "
               "its model family lays them out (LLaVA: the patch grid; LLaVA-NeXT: the base "
               "grid and the unpadded tile grid; Qwen2-VL: the merged grid (h/2, w/2) of each "
               "image or video frame); odd edges and LLaVA-NeXT's newlines are in no window",
    "tau": "jaxmm's own threshold (default 0.05), relative to layer 1",
    "horizon": "jaxmm's own rule: the first layer >= 1 where mean_w |I_l(w)| <= tau * mean_w "
               "|I_1(w)|; the paper defines the horizon qualitatively",
}


def plot(res: dict, out: Path) -> None:
  plt = common.pyplot()
  cats = list(res["categories"])
  grid = np.array([res["categories"][c]["mean_abs"] for c in cats])   # [C, L']
  fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(res["layers"]) + 2), 1 + 0.5 * len(cats)))
  im = ax.imshow(grid, aspect="auto", cmap="viridis",
                 extent=(res["layers"][0] - 0.5, res["layers"][-1] + 0.5, len(cats) - 0.5, -0.5))
  ax.set_yticks(range(len(cats)), cats)
  ax.set_xlabel("probe layer l")
  ax.set_title(f"{common.model_name(res['model'])}: mean |I_l(w)| (2x2 windows)", fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  checkpoint.atomic_file(out / "horizon_heatmap.png",
                         lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for c in cats:
    s = res["categories"][c]
    line, = ax.plot(res["layers"], s["mean_abs"], "o-", ms=3, label=f"{c} (ℓ_H={s['horizon']})")
    if s["horizon"] is not None:
      ax.axvline(s["horizon"], color=line.get_color(), ls=":", lw=1)
  ax.set_yscale("symlog", linthresh=1e-6)
  ax.set_xlabel("probe layer l")
  ax.set_ylabel("mean |I_l(w)|")
  ax.legend(fontsize=8)
  fig.tight_layout()
  checkpoint.atomic_file(out / "horizon_curves.png",
                         lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
  plt.close(fig)


def run(args) -> int:
  m, rows, pr = common.load(args)
  layers = common.parse_layers(args.layers, 1, m.config.text.num_layers)
  res = analyze(m, rows, pr, args.image_folder, vqa.read_answer_key(args.answer_key), args.tau,
                layers)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(out / "horizon.json", res, indent=1)
  plot(res, out)
  cats = list(res["categories"])
  print(f"{'layer':>5} " + " ".join(f"{c[:10]:>10}" for c in cats) + "   (mean |I_l|)")
  for i, l in enumerate(res["layers"]):
    print(f"{l:>5} " + " ".join(f"{res['categories'][c]['mean_abs'][i]:>10.2e}" for c in cats))
  print("horizon: " + ", ".join(f"{c}={res['categories'][c]['horizon']}" for c in cats))
  print(f"{res['questions']} questions, {res['seconds_per_question']:.3f} s/question "
        f"({res['seconds_per_question_after_first'] or 0:.3f} after the first)")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
