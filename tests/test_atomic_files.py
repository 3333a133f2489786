"""`jaxmm.checkpoint.atomic_file` / `write_json`: all or nothing, usual permissions."""
import json
import os

import pytest

from jaxmm import checkpoint


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = checkpoint.write_json(tmp_path / "sub" / "r.json", {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}

  def half_then_fail(tmp):
    tmp.write_text("{\"a\": ")
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    checkpoint.atomic_file(path, half_then_fail)
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(path.parent) == ["r.json"]


def test_the_file_gets_the_permissions_a_plain_open_gives(tmp_path):
  plain = tmp_path / "plain.txt"
  plain.write_text("x")
  made = checkpoint.atomic_file(tmp_path / "made.txt", lambda tmp: tmp.write_text("x"))
  assert made.stat().st_mode == plain.stat().st_mode
