"""eval/bench_mgfte.py: the PyTorch rebuild of the reference step against jaxmm, at a tiny shape."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from jaxmm.eval import bench_mgfte
from jaxmm.mgfte import crf as crf_lib

REPO = Path(__file__).resolve().parents[2]


def test_rebuilt_crf_matches_jaxmm_crf():
  """The rebuild's CRF (pytorch-crf's algorithm) against jaxmm's: likelihood and Viterbi paths."""
  torch.manual_seed(0)
  crf = bench_mgfte.torch_crf(5)
  params = {k: jax.numpy.asarray(getattr(crf, n).detach().numpy())
            for k, n in (("start", "start"), ("end", "end"), ("trans", "trans"))}
  rng = np.random.default_rng(0)
  em = rng.standard_normal((4, 7, 5)).astype(np.float32)
  tags = rng.integers(0, 5, (4, 7))
  mask = (np.arange(7)[None] < np.array([7, 3, 1, 5])[:, None]).astype(np.int64)
  ll_t = crf.log_likelihood(torch.tensor(em), torch.tensor(tags), torch.tensor(mask))
  ll_j = crf_lib.log_likelihood(params, em, tags, mask)
  np.testing.assert_allclose(ll_t.detach().numpy(), np.asarray(ll_j), rtol=1e-5, atol=1e-5)
  paths = crf.decode(torch.tensor(em), torch.tensor(mask))
  vit = np.asarray(crf_lib.viterbi(params, em, mask))
  for i, p in enumerate(paths):
    assert p == vit[i, :len(p)].tolist()


def _tiny_hf_folder(src: Path, out: Path) -> Path:
  """A random 2-layer BERT with the word-piece vocabulary and tokenizer files of `src` (MiniLM)."""
  cfg = transformers.BertConfig.from_pretrained(src)
  cfg.update({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 37})
  torch.manual_seed(0)
  transformers.BertModel(cfg).save_pretrained(out)
  for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(src / f, out / f)
  return out


def test_cli_times_both_steps_on_the_same_episodes(tmp_path, shared_data, tokenizer_dir):
  shared_data("fewrel")
  hf = _tiny_hf_folder(tokenizer_dir, tmp_path / "hf")
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "-m", "jaxmm.eval.bench_mgfte", "--hf", str(hf), "--runs", "2",
         "--max-per-relation", "8", "--batch", "1", "--n", "2", "--k", "2", "--q", "2",
         "--out", str(out)]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads(out.read_text())
  assert len(res["times_s"]["jaxmm"]) == len(res["times_s"]["torch_reference"]) == 2
  assert all(t > 0 for ts in res["times_s"].values() for t in ts)
  assert res["ratio_jaxmm_over_reference"] == (res["jaxmm_median_s"]
                                               / res["torch_reference_median_s"])
  assert res["episode"] == {"batch": 1, "n": 2, "k": 2, "q": 2, "padded_length": 90}
  assert set(res["jaxmm_cuts"]) <= {48, 64, 90} and res["matmul_gflops"] > 0
  assert "jaxmm / reference" in r.stdout
