"""Entropy Collapse Layer: per-layer visual-token entropy curves over a calibration question set.

  jaxmm analyze ecl --model M --questions Q.jsonl --image-folder DIR --out DIR [--limit N]

Per question, one captured forward gives every layer's pre-RoPE queries and the hidden states
entering each layer; `jaxmm.analysis.ecl` turns them into the mean token-wise matrix entropy S̄_l
(pruning.md §2.1) and the global von Neumann entropy of the visual block (§2.2). The curves are
averaged over questions and the ECL is K* = argmax_{1<=l<=L/2} (S̄_{l-1} - S̄_l).
Writes OUT/ecl.json and OUT/ecl.png (both curves, the detected layer marked).
"""
import argparse
import time
from pathlib import Path

import numpy as np

import jaxmm.cli
from jaxmm.eval import analyze_common as common
from jaxmm import checkpoint
from jaxmm.analysis import ecl
from jaxmm.analysis.capture import Capture


# Which numbers are the papers' definitions and which are jaxmm's own choices.
DEFINITIONS = {
    "mean_token_entropy": "EntropyPrune's token-wise matrix entropy (paper §2.1, reference code: "
                          "dual Gram of the centred per-head queries, no trace normalisation, so "
                          "it grows with query norms), averaged over the visual tokens",
    "mean_token_entropy_trace_normalised": "jaxmm's own: the same Gram divided by its trace "
                                           "(norm-free), to tell a collapse from norm growth",
    "global_entropy": "von Neumann entropy of the visual block (pruning.md §2.2)",
    "ecl_layer": "jaxmm's own rule (the reference code has none): the largest one-layer drop "
                 "of the mean token-wise entropy over layers 1..L/2",
}


def add_args(p: argparse.ArgumentParser) -> None:
  common.add_common_args(p)


def analyze(m, rows, pr, image_folder) -> dict:
  """Curves averaged over the readable questions, the ECL layer and timings."""
  n_l = m.config.text.num_layers
  mean, norm, glob, secs = [], [], [], []
  for _, _, out, fwd_s in common.captured(m, rows, pr, image_folder,
                                             Capture(hidden=True, queries=True), "analyze ecl"):
    t0 = time.perf_counter()
    cap = out.captured
    s_mean, s_glob = ecl.curves(cap["hidden"][:n_l, 0], cap["queries"][:, 0], cap["visual"][0])
    mean.append(np.asarray(s_mean))
    norm.append(np.asarray(ecl.mean_normalised_entropy(cap["queries"][:, 0], cap["visual"][0])))
    glob.append(np.asarray(s_glob))
    secs.append(fwd_s + time.perf_counter() - t0)
  mean, glob = np.asarray(mean, np.float64), np.asarray(glob, np.float64)
  curve, norm = mean.mean(0), np.asarray(norm, np.float64).mean(0)
  return {"model": str(m.path), "num_layers": n_l, "layers": list(range(n_l)),
          "mean_token_entropy": curve.tolist(), "mean_token_entropy_std": mean.std(0).tolist(),
          "global_entropy": glob.mean(0).tolist(), "global_entropy_std": glob.std(0).tolist(),
          "ecl_layer": ecl.ecl_layer(curve),
          "drops": (curve[:-1] - curve[1:]).tolist(),
          "rule": "argmax_{1<=l<=L/2} (S_{l-1} - S_l) of the mean token-wise entropy",
          "mean_token_entropy_trace_normalised": norm.tolist(),
          "ecl_layer_trace_normalised": ecl.ecl_layer(norm),
          "definitions": DEFINITIONS,
          **common.timing(secs)}


def plot(res: dict, path: Path) -> None:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  ax.plot(res["layers"], res["mean_token_entropy"], "o-", label="mean token-wise entropy S̄_l")
  ax.plot(res["layers"], res["global_entropy"], "s-", label="global von Neumann entropy")
  ax.axvline(res["ecl_layer"], color="red", ls="--", label=f"ECL = layer {res['ecl_layer']}")
  ax.set_xlabel("decoder layer l")
  ax.set_ylabel("entropy (/ ln of the Gram size)")
  ax.set_title(f"{common.model_name(res['model'])}: {res['questions']} questions")
  ax.legend(fontsize=8)
  fig.tight_layout()
  checkpoint.atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
  plt.close(fig)


def run(args) -> int:
  m, rows, pr = common.load(args)
  res = analyze(m, rows, pr, args.image_folder)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(out / "ecl.json", res, indent=1)
  plot(res, out / "ecl.png")
  print(f"{'layer':>5} {'S_mean':>8} {'S_norm':>8} {'S_glob':>8}")
  for l, a, n, b in zip(res["layers"], res["mean_token_entropy"],
                        res["mean_token_entropy_trace_normalised"], res["global_entropy"]):
    print(f"{l:>5} {a:>8.4f} {n:>8.4f} {b:>8.4f}")
  print("S_mean: the reference's token entropy (no trace normalisation); S_norm: trace-"
        "normalised (jaxmm's); the ECL rule is jaxmm's own (see ecl.json 'definitions')")
  print(f"ECL layer: {res['ecl_layer']} (trace-normalised: {res['ecl_layer_trace_normalised']}); "
        f"{res['questions']} questions, "
        f"{res['seconds_per_question']:.3f} s/question "
        f"({res['seconds_per_question_after_first'] or 0:.3f} after the first)")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
