"""The stack beside the `[lmms]` extra: lmms-eval 0.7.3 pulls PyPI's torchvision (built for CUDA
torch) and moves protobuf to 6.x. Beside the CPU torch that torchvision cannot register its
operators ("operator torchvision::nms does not exist") and transformers then fails to import the
processors jaxmm reads every model folder with; the Makefile uninstalls it. These checks hold
with or without lmms-eval installed."""
import importlib.util

import numpy as np


def test_transformers_processors_import():
  from transformers import (CLIPImageProcessor, LlavaNextProcessor, LlavaProcessor,
                            Qwen2_5_VLProcessor, Qwen2VLProcessor)
  assert all(c.__name__ for c in (CLIPImageProcessor, LlavaNextProcessor, LlavaProcessor,
                                  Qwen2_5_VLProcessor, Qwen2VLProcessor))


def test_torchvision_is_absent_or_works():
  if importlib.util.find_spec("torchvision") is None:
    return
  import torch
  import torchvision
  boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
  assert torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0]


def test_orbax_round_trip_under_the_installed_protobuf(tmp_path):
  from jaxmm import checkpoint
  params = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(4, np.int32)}
  checkpoint.write_params(tmp_path / "m", params)
  back = checkpoint.load_params(tmp_path / "m")
  np.testing.assert_array_equal(np.asarray(back["a"]["w"]), params["a"]["w"])
  np.testing.assert_array_equal(np.asarray(back["b"]), params["b"])
