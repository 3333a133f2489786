"""Digits-VQA: disjoint real scans, deterministic, correct answers, LLaVA-format files."""
import re

import numpy as np
import pytest
from PIL import Image

from jaxmm.data import digits_vqa as dv
from jaxmm.data import vqa

CFG = dv.DigitsVQAConfig()


def test_train_and_test_scans_are_disjoint_and_cover_the_set():
  tr, te = dv.scan_split(CFG, "train"), dv.scan_split(CFG, "test")
  assert not set(tr) & set(te)
  assert len(tr) + len(te) == 1797 and len(te) == round(0.2 * 1797)
  _, labels = dv._scans()
  for split, ids in (("train", tr), ("test", te)):
    pools = dv._pools(CFG, split)
    assert sorted(np.concatenate(list(pools.values()))) == sorted(ids)
    assert all((labels[p] == c).all() for c, p in pools.items())


def test_deterministic_from_the_seed():
  a_img, a_qa = dv.make_split(CFG, "test", 6, seed=3)
  b_img, b_qa = dv.make_split(CFG, "test", 6, seed=3)
  c_img, _ = dv.make_split(CFG, "test", 6, seed=4)
  np.testing.assert_array_equal(a_img, b_img)
  assert a_qa == b_qa
  assert not np.array_equal(a_img, c_img)
  assert a_img.shape == (6, 48, 48) and a_img.dtype == np.uint8


def test_render_places_upscaled_scans_in_row_major_cells():
  ids = dv.scan_split(CFG, "test")[:9].reshape(3, 3)
  img = dv.render(CFG, ids)
  scans, _ = dv._scans()
  cell = img[16:32, 32:48]  # row 2, column 3
  want = (scans[ids[1, 2]] * 255 / 16).repeat(2, 0).repeat(2, 1).round()
  np.testing.assert_array_equal(cell, want)


def _answer(question, grid):
  """Recomputes the answer from the question text and the label grid."""
  nums = [int(x) for x in re.findall(r"\d+", question)]
  if question.startswith("What digit"):
    return str(grid[nums[0] - 1, nums[1] - 1])
  if question.startswith("How many"):
    return str(int((grid == nums[0]).sum()))
  return "yes" if (grid == nums[0]).any() else "no"


def test_answers_are_right_for_every_category():
  rng = np.random.default_rng(0)
  for _ in range(200):
    grid = rng.integers(0, 10, (3, 3))
    for cat in dv.CATEGORIES:
      q, a = dv.ask(cat, grid, rng, want_yes=bool(rng.integers(2)))
      assert a == _answer(q, grid), (cat, q, a, grid)


def test_cell_labels_are_the_grid_the_questions_are_about():
  images, items, cells = dv.make_split(CFG, "train", 8, seed=2, per_category=3, with_labels=True)
  again, items2 = dv.make_split(CFG, "train", 8, seed=2, per_category=3)
  np.testing.assert_array_equal(images, again)  # the labels do not change the draw
  assert items == items2 and cells.shape == (8, CFG.grid, CFG.grid)
  for grid, qa in zip(cells, items):
    for cat, q, a in qa:
      if cat == "cell":
        r, c = map(int, re.findall(r"\d+", q))
        assert str(grid[r - 1, c - 1]) == a
      elif cat == "count":
        d = int(re.findall(r"\d+", q)[0])
        assert str(int((grid == d).sum())) == a


def test_presence_is_balanced_and_counts_vary():
  _, items = dv.make_split(CFG, "test", 100, seed=0)
  pres = [a for qa in items for c, _, a in qa if c == "presence"]
  counts = {a for qa in items for c, _, a in qa if c == "count"}
  assert pres.count("yes") == pres.count("no") == 50
  assert {"0", "1", "2", "3"} <= counts


def test_vocabulary_covers_every_question_and_answer():
  _, items = dv.make_split(CFG, "train", 50, seed=1, per_category=3)
  used = {w for qa in items for _, q, a in qa for w in (q + " " + a).split()}
  assert used <= set(dv.words(CFG))


def test_write_split_writes_llava_question_file_key_and_pngs(tmp_path):
  paths = dv.write_split(CFG, tmp_path / "test", n_images=4, seed=2)
  qs = vqa.read_questions(paths["questions"])
  key = vqa.read_answer_key(paths["answers"])
  assert len(qs) == 12 and all(set(q) == {"question_id", "image", "text", "category"} for q in qs)
  assert all("answer" not in q for q in qs) and set(key) == {q["question_id"] for q in qs}
  images, items = dv.make_split(CFG, "test", 4, seed=2)
  for i, q in enumerate(qs):
    png = np.asarray(Image.open(paths["images"] / q["image"]))
    np.testing.assert_array_equal(png[..., 0], images[i // 3])
    assert (q["category"], q["text"], key[q["question_id"]]["answer"]) == items[i // 3][i % 3]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_unknown_split_or_category_is_rejected():
  with pytest.raises(ValueError):
    dv.scan_split(CFG, "val")
  with pytest.raises(ValueError):
    dv.ask("colour", np.zeros((3, 3), int), np.random.default_rng(0))
