"""Every family's `init_params` builds exactly the tree its converter rule table fills: the same
leaves, the same shapes (by shape, with `jax.eval_shape`: nothing is allocated)."""
import dataclasses

import jax
import pytest

from jaxmm.converters import bert as bert_rules
from jaxmm.converters import cadit as cadit_rules
from jaxmm.converters.common import flatten
from jaxmm import config as config_lib
from jaxmm import registry
from jaxmm.cadit import config as cadit_config
from jaxmm.cadit import networks
from jaxmm.models import bert

TINY_TEXT = config_lib.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96,
                                   num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12)
TINY_VISION = config_lib.ClipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=3,
                                          num_heads=4, image_size=28, patch_size=7)


def _shapes(tree) -> dict:
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def _check(init, rules):
  got = _shapes(jax.eval_shape(init, jax.random.key(0)))
  want = {r.dst: r.out_shape() for r in rules}
  assert sorted(got) == sorted(want)
  assert got == want


CONFIGS = {
    "llama": [TINY_TEXT, dataclasses.replace(TINY_TEXT, tie_word_embeddings=True,
                                             attention_bias=True, mlp_bias=True),
              config_lib.smollm2_135m()],
    "llava": [config_lib.LlavaConfig(vision=TINY_VISION, text=TINY_TEXT, image_token_id=100),
              config_lib.LlavaConfig(vision=TINY_VISION, text=TINY_TEXT, image_token_id=100,
                                     vision_feature_layer=(-2, -1),
                                     vision_feature_select_strategy="full",
                                     multimodal_projector_bias=False),
              config_lib.llava15_7b(), config_lib.llava_bench()],
}


@pytest.mark.parametrize("family, i", [(f, i) for f, cs in CONFIGS.items() for i in range(len(cs))])
def test_decoder_family_init_equals_its_rule_table(family, i):
  cfg = CONFIGS[family][i]
  fam = registry.family_module(family)
  _check(lambda k: fam.init_params(cfg, k), fam.rules(cfg))


def test_llava15_7b_parameter_count_by_shape():
  cfg = config_lib.llava15_7b()
  tree = jax.eval_shape(lambda k: registry.family_module("llava").init_params(cfg, k),
                        jax.random.key(0))
  n = sum(int(x.size) for x in jax.tree.leaves(tree))
  d, f, v = 1024, 4096, 32064   # by hand: CLIP ViT-L/14-336 without the unused post-LN
  clip_layer = 2 * 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
  clip = 14 * 14 * 3 * d + d + 577 * d + 2 * d + 24 * clip_layer                  # 303,505,408
  projector = (d * 4096 + 4096) + (4096 * 4096 + 4096)                             # 20,979,712
  llm_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
  llm = 2 * v * 4096 + 32 * llm_layer + 4096                                      # 6,738,939,904
  assert n == clip + projector + llm == 7_063_425_024


def test_bert_init_equals_its_rule_table():
  cfg = bert.Config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                    intermediate_size=64, max_position_embeddings=40)
  _check(lambda k: bert.init_params(cfg, k), bert_rules.rules(cfg))


def test_cadit_init_equals_its_rule_table():
  cfg = cadit_config.tiny()
  _check(lambda k: networks.init_params(cfg, k), cadit_rules.rules(cfg))
