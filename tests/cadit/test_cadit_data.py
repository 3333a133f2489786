"""Digit protocols on the real data, user .npz checks, stream resumption, and CLI input errors."""
import numpy as np
import pytest

from jaxmm import cli
from jaxmm.data import digits
from jaxmm.errors import InputError, JaxmmError


def test_real_protocols(shared_data):
  shared_data("digits")
  mnist, usps = digits.load_builtin("mnist"), digits.load_builtin("usps")
  assert mnist.x_train.shape == (8000, 32, 32, 1) and mnist.x_test.shape == (2000, 32, 32, 1)
  assert usps.x_train.shape == (7291, 32, 32, 1) and usps.x_test.shape == (2007, 32, 32, 1)
  raw = np.load(shared_data("digits", "mnist_test.npz"))["y"]
  np.testing.assert_array_equal(mnist.y_test, raw[8000:])  # the last 2,000 are MNIST test
  assert -1.0 <= mnist.x_train.min() < -0.99 and 0.9 < mnist.x_train.max() <= 1.0
  src, tgt = digits.load_task("uci-usps")
  assert src.x_train.shape == (1500, 32, 32, 1) and tgt.name == "usps"


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXMM_DATA", str(tmp_path / "nowhere"))
  with pytest.raises(JaxmmError, match="data not found.*JAXMM_DATA"):
    digits.load_task("usps-mnist")


def _write(path, sizes=((20, 12, 12), (10, 12, 12)), **over):
  r = np.random.default_rng(0)
  arrays = {"x_train": r.integers(0, 256, sizes[0], dtype=np.uint8),
            "y_train": r.integers(0, 10, sizes[0][0]),
            "x_test": r.integers(0, 256, sizes[1], dtype=np.uint8),
            "y_test": r.integers(0, 10, sizes[1][0])}
  np.savez(path, **{**arrays, **over})
  return path


def test_user_npz(tmp_path):
  d = digits.load_npz(_write(tmp_path / "mine.npz"), size=16)
  assert d.x_train.shape == (20, 16, 16, 1) and d.x_test.shape == (10, 16, 16, 1)
  with pytest.raises(InputError, match="image sizes differ: x_train is 12x12, x_test is 16x16"):
    digits.load_npz(_write(tmp_path / "bad.npz", sizes=((20, 12, 12), (10, 16, 16))))
  with pytest.raises(InputError, match="missing arrays"):
    np.savez(tmp_path / "nokeys.npz", x=np.zeros((2, 8, 8)))
    digits.load_npz(tmp_path / "nokeys.npz")
  with pytest.raises(InputError, match="y_train has shape"):
    digits.load_npz(_write(tmp_path / "short.npz", y_train=np.zeros(3, np.int64)))
  with pytest.raises(InputError, match="no such .npz"):
    digits.load_npz(tmp_path / "absent.npz")


def test_stream_order_is_resumable():
  a = digits.Stream(10, 4, seed=3, stream=0)
  seen = [a.next() for _ in range(3)]  # 2 batches per epoch; the third starts epoch 1
  assert len(set(np.concatenate(seen[:2]).tolist())) == 8
  b = digits.Stream(10, 4, seed=3, stream=0)
  b.restore(a.state())
  np.testing.assert_array_equal(a.next(), b.next())
  with pytest.raises(InputError, match="batch size"):
    digits.Stream(3, 4, 0, 0)


@pytest.mark.parametrize("argv, msg", [
    (["--task", "svhn-mnist"], "unknown task 'svhn-mnist'"),
    (["--task", "usps-mnist", "--set", "nope=1"], "--set 'nope=1'"),
    (["--task", "usps-mnist", "--method", "adda"], "method='adda'"),
])
def test_cli_bad_inputs(argv, msg, capsys):
  assert cli.main(["train", "cadit", *argv]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0]


def test_cli_mismatched_npz(tmp_path, capsys):
  bad = _write(tmp_path / "bad.npz", sizes=((20, 12, 12), (10, 16, 16)))
  argv = ["train", "cadit", "--task", "usps-mnist", "--source-npz", str(bad), "--preset", "tiny",
          "--out", str(tmp_path / "run")]
  assert cli.main(argv) == 2
  assert "image sizes differ" in capsys.readouterr().err
