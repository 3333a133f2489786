"""`jaxmm train mgfte` killed mid-run resumes from its checkpoint with the same data order;
`jaxmm eval mgfte` reads the best model it wrote. Tiny random encoder, a handful of steps."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import jaxmm.cli
from jaxmm.checkpoint import TrainCheckpointer
from jaxmm.data import fewrel
from jaxmm.mgfte import training
from jaxmm.mgfte.episodes import EpisodeSampler
from jaxmm.train import mgfte as train_mgfte

REPO = Path(__file__).resolve().parents[2]
STEPS = 5


def _argv(out, tokenizer_dir, *extra):
  return ["--tiny", "--tokenizer", str(tokenizer_dir), "--out", str(out), "--steps", str(STEPS),
          "--max-per-relation", "12", "--batch", "1", "--n", "2", "--k", "2", "--q", "2",
          "--val-n", "2", "--val-k", "2", "--val-episodes", "2", "--eval-every", "100",
          "--ckpt-every", "2", "--log-every", "1",
          # the baseline is the cheaper graph to compile; resuming does not depend on the variant
          "--length-buckets", "", "--variant", "baseline", *extra]


def _train(out, tokenizer_dir, *extra):
  cmd = [sys.executable, "-m", "jaxmm.train.mgfte", *_argv(out, tokenizer_dir, *extra)]
  # Both runs share a compilation cache, so the resumed run does not recompile (XLA_FLAGS, the
  # suite's fast-compile flags from conftest.py, is inherited).
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(Path(out).parent / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _steps(log: Path) -> dict:
  recs = [json.loads(l) for l in log.read_text().splitlines()]
  return {r["step"]: r for r in recs if "data" in r}


def test_killed_run_resumes_with_same_data_order(tmp_path, tokenizer_dir, tokenizer, shared_data,
                                                  capsys):
  shared_data("fewrel", "val_wiki.json")
  out = tmp_path / "run"
  killed = _train(out, tokenizer_dir, "--kill-at-step", "3")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  before = _steps(out / "log.jsonl")
  assert sorted(before) == [1, 2, 3] and not (out / "best").exists()
  assert not (out / "final").exists()

  # Resuming under other settings is a one-line error that leaves the folder as it was.
  saved = (out / "args.json").read_text()
  assert jaxmm.cli.module_main("jaxmm.train.mgfte", _argv(out, tokenizer_dir, "--seed", "1",
                                                          "--adv-mode", "dann")) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: {out} holds a different run (differs in ['adv_mode', 'seed']); "
      "use another --out folder or delete it")
  assert (out / "args.json").read_text() == saved

  resumed = _train(out, tokenizer_dir)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step 2" in resumed.stdout
  after = _steps(out / "log.jsonl")
  assert sorted(after) == list(range(1, STEPS + 1))
  # Step 3 ran before the kill and again after the resume from step 2: same data, same loss.
  assert after[3]["data"] == before[3]["data"]
  np.testing.assert_allclose(after[3]["loss"], before[3]["loss"], rtol=1e-6)

  # The data order of the whole run is that of one uninterrupted sampler.
  train = fewrel.load_split(fewrel.SPLITS["train"], tokenizer, max_per_relation=12)
  sampler = EpisodeSampler(train, 2, 2, 2, batch=1, seed=3000)
  assert [after[s]["data"] for s in range(1, STEPS + 1)] == [
      train_mgfte._fingerprint(sampler.sample()) for _ in range(STEPS)]

  # final/ holds the last step's params: the checkpoint of step STEPS
  _, _, final = training.load_extractor(out / "final")
  ckpt = TrainCheckpointer(out / "ckpt")
  step, state, _ = ckpt.restore_latest(None)
  ckpt.close()
  assert step == STEPS
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(a, b)

  scores = tmp_path / "scores.json"
  rc = jaxmm.cli.module_main("jaxmm.eval.mgfte", [
      "--model", str(out / "best"), "--settings", "2-2,3-2", "--episodes", "2", "--q", "2",
      "--max-per-relation", "12", "--length-buckets", "", "--out", str(scores)])
  assert rc == 0
  res = json.loads(scores.read_text())["results"]
  assert set(res) == {"2w2s", "3w2s"}
  assert 0.0 <= res["2w2s"]["relation"] <= 1.0 and 0.0 <= res["3w2s"]["triple"]["f1"] <= 1.0
