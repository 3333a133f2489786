"""Name table for BERT encoders (`model_type` "bert"), e.g. all-MiniLM-L6-v2, bert-base-uncased.

`BertModel.save_pretrained` writes bare names (`embeddings.*`, `encoder.*`, `pooler.*`); the
task models (`BertForMaskedLM`, `BertForPreTraining`, ...) prefix them with `bert.` and add
heads under `cls.`, which the encoder does not use.
"""
from jaxmm.converters.common import Plan, Rule
from jaxmm.errors import ConversionError
from jaxmm.models.bert import Config

IGNORE = (r"(^|\.)embeddings\.position_ids$",   # a buffer: arange(max_position_embeddings)
          r"^cls\.")                              # pre-training / MLM heads


def _linear(src: str, dst: str, d_in: int, d_out: int, layers=None, *, axes) -> list[Rule]:
  """A torch Linear [out, in] + bias -> Flax Dense kernel [in, out] + bias (`axes`: in, out)."""
  return [Rule(f"{src}.weight", f"{dst}/kernel", (d_out, d_in), "T", layers, axes),
          Rule(f"{src}.bias", f"{dst}/bias", (d_out,), "id", layers, axes[1:])]


def _layer_norm(src: str, dst: str, d: int, layers=None) -> list[Rule]:
  return [Rule(f"{src}.weight", f"{dst}/scale", (d,), "id", layers, ("embed",)),
          Rule(f"{src}.bias", f"{dst}/bias", (d,), "id", layers, ("embed",))]


Q, O, UP, DOWN = ("embed", "heads"), ("heads", "embed"), ("embed", "mlp"), ("mlp", "embed")


def rules(cfg: Config, prefix: str = "") -> list[Rule]:
  """The whole encoder; `prefix` is "" or "bert."."""
  d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  emb, lay, out = f"{prefix}embeddings.", f"{prefix}encoder.layer.{{i}}.", "layers/"
  return [
      Rule(f"{emb}word_embeddings.weight", "embeddings/word_embeddings/embedding",
           (cfg.vocab_size, d), axes=("vocab", "embed")),
      Rule(f"{emb}position_embeddings.weight", "embeddings/position_embeddings/embedding",
           (cfg.max_position_embeddings, d), axes=(None, "embed")),
      Rule(f"{emb}token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding",
           (cfg.type_vocab_size, d), axes=(None, "embed")),
      *_layer_norm(f"{emb}LayerNorm", "embeddings/norm", d),
      *_linear(f"{lay}attention.self.query", f"{out}attention/query", d, d, n, axes=Q),
      *_linear(f"{lay}attention.self.key", f"{out}attention/key", d, d, n, axes=Q),
      *_linear(f"{lay}attention.self.value", f"{out}attention/value", d, d, n, axes=Q),
      *_linear(f"{lay}attention.output.dense", f"{out}attention/out", d, d, n, axes=O),
      *_layer_norm(f"{lay}attention.output.LayerNorm", f"{out}attention_norm", d, n),
      *_linear(f"{lay}intermediate.dense", f"{out}mlp/up", d, f, n, axes=UP),
      *_linear(f"{lay}output.dense", f"{out}mlp/down", f, d, n, axes=DOWN),
      *_layer_norm(f"{lay}output.LayerNorm", f"{out}mlp_norm", d, n),
      *_linear(f"{prefix}pooler.dense", "pooler", d, d, axes=(None, "embed")),
  ]


def plan(hf_config: dict, names: list[str]) -> Plan:
  """The conversion plan for a BERT checkpoint whose tensor names are `names`."""
  cfg = Config.from_hf(hf_config)
  have = set(names)
  for prefix in ("", "bert."):
    if f"{prefix}embeddings.word_embeddings.weight" in have:
      return Plan("bert", cfg, rules(cfg, prefix), IGNORE)
  raise ConversionError("not a BERT checkpoint: no embeddings.word_embeddings.weight "
                        "(bare or under bert.)")
