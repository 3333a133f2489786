"""Resumption: an interrupted run continues exactly; a SIGKILLed CLI run resumes from its checkpoint."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxmm.cadit import config, loop
from jaxmm.data import digits
from jaxmm.errors import JaxmmError

REPO = Path(__file__).resolve().parents[2]


def _npz(path, n, seed):
  """A small synthetic domain: random 12x12 blobs, labels 0..9."""
  r = np.random.default_rng(seed)
  np.savez(path, x_train=r.integers(0, 256, (n, 12, 12), dtype=np.uint8),
           y_train=r.integers(0, 10, n), x_test=r.integers(0, 256, (20, 12, 12), dtype=np.uint8),
           y_test=r.integers(0, 10, 20))
  return path


def test_interrupted_run_continues_exactly(tmp_path):
  cfg = config.tiny()  # the same config as test_cadit_steps: its compiled steps are reused
  source = digits.load_npz(_npz(tmp_path / "s.npz", 40, 0), cfg.image_size)
  target = digits.load_npz(_npz(tmp_path / "t.npz", 40, 1), cfg.image_size)
  spec = loop.RunSpec(cfg, "usps-mnist", seed=3)
  kw = dict(ckpt_every=2, grid_every=3, fast_compile=True, log=lambda _: None)
  straight = loop.train(spec, source, target, tmp_path / "a", **kw)
  assert loop.train(spec, source, target, tmp_path / "b", stop_after=5, **kw) is None
  assert not (tmp_path / "b" / "results.json").exists()
  resumed = loop.train(spec, source, target, tmp_path / "b", **kw)
  assert resumed["target_acc"] == straight["target_acc"]
  _, pa, _ = loop.load_model(tmp_path / "a" / "model")
  _, pb, _ = loop.load_model(tmp_path / "b" / "model")
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(a, b)
  assert sorted(p.name for p in (tmp_path / "a").glob("grid_*.png")) == [
      "grid_000006.png", "grid_000009.png"]
  other = loop.RunSpec(cfg, "usps-mnist", seed=4)
  with pytest.raises(JaxmmError, match=r"different run \(differs in \['seed'\]\)"):
    loop.train(other, source, target, tmp_path / "b", **kw)


def test_killed_cli_run_resumes_from_last_checkpoint(tmp_path):
  src, tgt = _npz(tmp_path / "s.npz", 40, 0), _npz(tmp_path / "t.npz", 40, 1)
  out = tmp_path / "run"
  argv = [sys.executable, "-m", "jaxmm.train.cadit", "--task", "usps-mnist", "--method", "dann",
          "--preset", "tiny", "--steps", "60", "--ckpt-every", "5", "--fast-compile",
          "--source-npz", str(src), "--target-npz", str(tgt), "--out", str(out)]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if line.startswith("checkpoint saved at step"):
      os.kill(proc.pid, signal.SIGKILL)  # mid-run: 63 steps were asked for
      break
  proc.wait()
  assert proc.returncode == -signal.SIGKILL and not (out / "results.json").exists()
  done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  first = done.stdout.splitlines()[0]
  assert first.startswith("resumed from step ")
  step = int(first.split()[3])
  assert 5 <= step < 63 and step % 5 == 0
  results = json.loads((out / "results.json").read_text())
  assert results["iterations"] == 63 and results["config"]["method"] == "dann"
