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


def test_tiled_layout_puts_each_scan_in_its_drawn_tile_and_leaves_the_rest_blank():
  cfg = dv.DigitsVQAConfig(grid=3, cell_px=32, tiles=4)   # 96 px, 8 px tiles, scans at 1x
  ids = dv.scan_split(cfg, "test")[:9].reshape(3, 3)
  tile = np.arange(9).reshape(3, 3) % 16 + 3                  # arbitrary tiles, one per cell
  img = dv.render(cfg, ids, tile)
  scans, _ = dv._scans()
  want = np.zeros((96, 96))
  for (r, c), t in np.ndenumerate(tile):
    y, x = 32 * r + 8 * (t // 4), 32 * c + 8 * (t % 4)
    want[y:y + 8, x:x + 8] = (scans[ids[r, c]] * 255 / 16).round()
  np.testing.assert_array_equal(img, want)


def test_tiled_splits_are_deterministic_and_draw_varied_tiles():
  cfg = dv.DigitsVQAConfig(grid=3, cell_px=32, tiles=4)
  a, qa = dv.make_split(cfg, "test", 4, seed=1)
  b, qb = dv.make_split(cfg, "test", 4, seed=1)
  np.testing.assert_array_equal(a, b)
  assert qa == qb and a.shape == (4, 96, 96)
  blocks = a.reshape(4, 12, 8, 12, 8).max((2, 4)) > 0        # which 8 px tiles hold ink
  cells = blocks.reshape(4, 3, 4, 3, 4).transpose(0, 1, 3, 2, 4).reshape(4, 9, 16)
  assert (cells.sum(-1) <= 1).all() and (cells.sum(-1) == 1).mean() > 0.9   # one tile per cell
  assert len(set(cells.argmax(-1).ravel().tolist())) > 5                    # not a fixed tile


@pytest.mark.parametrize("kw", [dict(cell_px=12), dict(cell_px=32, tiles=3), dict(tiles=0)])
def test_a_layout_that_cannot_hold_whole_pixel_scans_is_refused(kw):
  with pytest.raises(ValueError, match="cell_px a multiple of 8"):
    dv.DigitsVQAConfig(**kw)
