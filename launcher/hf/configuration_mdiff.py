"""transformers config of an mdiff export (copied into the export by launcher/hf_export.py; needs only
transformers).

The export's config.json is one file for two readers: launcher/export.read_export reads its mdiff keys
(`format`, `architecture`, `diffusion`, `data`, `config`, `sha256`, ...), transformers reads `model_type`,
`architectures` and `auto_map` and builds this class from the whole file. The architecture is read from
the export's own `architecture` block (one source of truth, nothing duplicated in the file); the usual
transformers names (hidden_size, num_hidden_layers, ...) are attributes derived from it.

    vocab_size     V real tokens = the width of the logits; input ids also take mask_token_id = V
    mask_token_id  V
"""
from __future__ import annotations

from transformers import PretrainedConfig

# the export's weight dtype names -> torch's (transformers reads `dtype` as a torch dtype name)
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_len", "vocab_size",
             "position_embedding", "time_conditioning")


class MDiffConfig(PretrainedConfig):
    model_type = "mdiff"

    def __init__(self, architecture: dict | None = None, diffusion: dict | None = None, data: dict | None = None,
                 **kwargs):
        if kwargs.get("dtype") in _DTYPES:
            kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
        kwargs.setdefault("tie_word_embeddings", False)   # input table has V + 1 rows (Prime: sub-tokens), output V
        super().__init__(**kwargs)
        # (PretrainedConfig keeps the other export keys as attributes: format, weights, step, config, sha256, ...)
        self.architecture = dict(architecture or {})
        self.diffusion = dict(diffusion or {"kind": "md4"})
        self.data = dict(data or {})
        if architecture is None:       # transformers builds a default config (no architecture) to diff against
            return
        missing = [k for k in _REQUIRED if k not in self.architecture]
        if missing:
            raise ValueError(f"config.json: architecture lacks {missing} (an mdiff export's config.json "
                             "has them all)")
        a = self.architecture
        if a["hidden_size"] % a["num_attention_heads"]:
            raise ValueError(f"config.json: architecture.hidden_size {a['hidden_size']} is not divisible by "
                             f"num_attention_heads {a['num_attention_heads']}")
        self.vocab_size = int(a["vocab_size"])
        self.mask_token_id = int(a.get("mask_id", a["vocab_size"]))
        self.hidden_size = int(a["hidden_size"])
        self.num_hidden_layers = int(a["num_layers"])
        self.num_attention_heads = int(a["num_attention_heads"])
        self.intermediate_size = int(a["ffn_hidden_size"])
        self.max_position_embeddings = int(a["seq_len"])
        self.layer_norm_eps = float(a.get("layernorm_eps", 1e-5))
        self.rope_theta = float(a.get("rope_base", 10000))
        kind = self.diffusion.get("kind", "md4")
        self.prime_l = int(self.diffusion["prime_l"]) if kind == "prime" else 0
        # exports written before the architecture block named them: the training config's model section
        model = (kwargs.get("config") or {}).get("model") or {}
        image_shape = a.get("image_shape", model.get("image_shape"))
        self.image_shape = [int(v) for v in image_shape] if image_shape else None
        self.dropout = float(a.get("dropout", model.get("dropout", 0.0)))

    def to_dict(self) -> dict:
        """As PretrainedConfig's, without the export's `sha256`: it names the exported model.safetensors, not
        the file save_pretrained writes (whose directory launcher/export.read_export then reads unverified)."""
        out = super().to_dict()
        out.pop("sha256", None)
        return out
