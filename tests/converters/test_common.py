"""The conversion engine on hand-made tensors: rules, stacking, checks, reading, export."""
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxmm.converters.common import Rule, TensorSource, check, convert, export
from jaxmm.errors import ConversionError

RNG = np.random.default_rng(0)
RULES = [
    Rule("emb", "embed", (5, 3)),
    Rule("blk.{i}.w", "layers/dense/kernel", (4, 3), "T", layers=3),
    Rule("blk.{i}.b", "layers/dense/bias", (4,), layers=3),
    Rule("conv.w", "patch/kernel", (6, 2, 3, 3), "conv"),
]


def make_sd() -> dict:
  sd = {"emb": RNG.standard_normal((5, 3), np.float32),
        "conv.w": RNG.standard_normal((6, 2, 3, 3), np.float32)}
  for i in range(3):
    sd[f"blk.{i}.w"] = RNG.standard_normal((4, 3), np.float32)
    sd[f"blk.{i}.b"] = RNG.standard_normal((4,), np.float32)
  return sd


def test_convert_transforms_and_stacks_in_layer_order():
  sd = make_sd()
  p = convert(TensorSource.from_state_dict(sd), RULES)
  np.testing.assert_array_equal(p["embed"], sd["emb"])
  assert p["layers"]["dense"]["kernel"].shape == (3, 3, 4)
  for i in range(3):
    np.testing.assert_array_equal(p["layers"]["dense"]["kernel"][i], sd[f"blk.{i}.w"].T)
    np.testing.assert_array_equal(p["layers"]["dense"]["bias"][i], sd[f"blk.{i}.b"])
  np.testing.assert_array_equal(p["patch"]["kernel"], sd["conv.w"].transpose(2, 3, 1, 0))
  assert p["patch"]["kernel"].shape == (3, 3, 2, 6) == RULES[3].out_shape()


def test_export_round_trip_both_ways():
  sd = make_sd()
  back = export(convert(TensorSource.from_state_dict(sd), RULES), RULES)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  p = convert(TensorSource.from_state_dict(back), RULES)
  q = convert(TensorSource.from_state_dict(export(p, RULES)), RULES)
  np.testing.assert_array_equal(p["layers"]["dense"]["kernel"], q["layers"]["dense"]["kernel"])


def test_missing_tensors_are_listed():
  sd = make_sd()
  del sd["blk.1.w"], sd["blk.2.b"]
  with pytest.raises(ConversionError, match=r"missing tensor\(s\): blk.1.w, blk.2.b \(2 in all\)"):
    convert(TensorSource.from_state_dict(sd), RULES)


def test_unknown_tensors_are_listed_unless_ignored():
  sd = make_sd() | {f"extra.{i}": np.zeros(1) for i in range(7)}
  with pytest.raises(ConversionError, match=r"unexpected tensor\(s\): extra.0, .* and 2 more \(7 in all\)"):
    convert(TensorSource.from_state_dict(sd), RULES)
  p = convert(TensorSource.from_state_dict(sd), RULES, ignore=(r"^extra\.\d$",))
  assert "extra" not in p


def test_shape_mismatch_names_tensor_and_shapes():
  sd = make_sd() | {"blk.2.w": np.zeros((3, 4), np.float32)}
  with pytest.raises(ConversionError, match=r"tensor blk.2.w: expected shape \(4, 3\), got \(3, 4\)"):
    check(TensorSource.from_state_dict(sd), RULES)


def test_bad_rule_tables_are_programming_errors():
  with pytest.raises(ValueError, match="unknown transform"):
    Rule("a", "b", (1,), "flip")
  with pytest.raises(ValueError, match="go together"):
    Rule("a.{i}", "b", (1,))
  with pytest.raises(ValueError, match="two rules write"):
    convert(TensorSource.from_state_dict({"a": np.zeros(1), "c": np.zeros(1)}),
            [Rule("a", "b", (1,)), Rule("c", "b", (1,))])


def test_export_rejects_uncovered_or_misshapen_leaves():
  p = convert(TensorSource.from_state_dict(make_sd()), RULES)
  with pytest.raises(ConversionError, match="not covered by the rules: stray"):
    export(p | {"stray": np.zeros(1)}, RULES)
  p["embed"] = np.zeros((5, 4))
  with pytest.raises(ConversionError, match=r"params leaf embed: expected shape \(5, 3\)"):
    export(p, RULES)


def test_half_precision_reads_as_float32_and_casts_to_dtype(tmp_path):
  x = RNG.standard_normal((5, 3)).astype(ml_dtypes.bfloat16)
  h = RNG.standard_normal((4, 3)).astype(np.float16)
  save_file({"emb": x, "h": h}, tmp_path / "model.safetensors")
  src = TensorSource.open(tmp_path)
  assert src.get("emb").dtype == np.float32 and src.get("h").dtype == np.float32
  np.testing.assert_array_equal(src.get("emb"), x.astype(np.float32))
  p = convert(src, [Rule("emb", "e", (5, 3)), Rule("h", "h", (4, 3), "T")], dtype="bfloat16")
  assert p["e"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(p["e"], x)
  np.testing.assert_array_equal(p["h"], h.T.astype(ml_dtypes.bfloat16))


def test_sharded_safetensors_stream_in_file_order(tmp_path):
  sd = make_sd()
  names = sorted(sd)
  shards = {"model-00002-of-00002.safetensors": names[:4], "model-00001-of-00002.safetensors": names[4:]}
  for fname, part in shards.items():
    save_file({k: sd[k] for k in part}, tmp_path / fname)
  weight_map = {k: f for f, part in shards.items() for k in part}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  src = TensorSource.open(tmp_path)
  assert list(src.shards()) == [sorted(names[4:]), sorted(names[:4])]
  p = convert(src, RULES)
  np.testing.assert_array_equal(p["embed"], sd["emb"])


def test_truncated_and_missing_files_are_named(tmp_path):
  with pytest.raises(ConversionError, match="holds no checkpoint"):
    TensorSource.open(tmp_path)
  save_file(make_sd(), tmp_path / "model.safetensors")
  data = (tmp_path / "model.safetensors").read_bytes()
  (tmp_path / "model.safetensors").write_bytes(data[:-10])
  with pytest.raises(ConversionError, match=r"model.safetensors is truncated: tensor \S+ needs"):
    TensorSource.open(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(data[:20])
  with pytest.raises(ConversionError, match="model.safetensors is not a readable safetensors file"):
    TensorSource.open(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"emb": "x.safetensors"}}))
  with pytest.raises(ConversionError, match="lists shard x.safetensors, which is missing"):
    TensorSource.open(tmp_path)


def test_corrupt_safetensors_headers_are_named(tmp_path):
  f = tmp_path / "model.safetensors"
  for entry, needle in [({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "spans 4 bytes"),
                        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype Q4"),
                        ({"dtype": "F32", "shape": [2]}, "corrupt header entry for tensor w")]:
    header = json.dumps({"w": entry}).encode()
    f.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ConversionError, match=needle):
      TensorSource.open(tmp_path)
