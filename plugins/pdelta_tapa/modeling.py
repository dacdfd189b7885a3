"""`llama_tapa`: a Llama whose attention is TAPA and which applies no rotary embedding anywhere.

Registered with AutoConfig / AutoModelForCausalLM on `import pdelta_tapa`, so a TAPA checkpoint
never loads as plain Llama (which would silently apply RoPE) and never needs remote code:

>>> import pdelta_tapa
>>> model = pdelta_tapa.load_model("tapa-ckpt")                       # doctest: +SKIP
>>> cfg = pdelta_tapa.tapa_config(LlamaConfig(hidden_size=128, ...))   # doctest: +SKIP

The layers are Llama's own (same tensor names, same MLP and norms); only the attention forward
differs: q/k/v projections, the KV cache update, then the registered "tapa" attention function
with the mask from the registered "tapa" mask function. The rotary module is replaced by one that
returns nothing, so no cos/sin is even computed. The config keeps the input's `rope_parameters`
(unused by this model, a record of what it was converted from) and carries `tapa_theta`, `tapa_alpha` and the
`paramdelta` section ({"transform": "tapa"}) that routes `paramdelta.plugins.load_model` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
)

from paramdelta.plugins import CONFIG_KEY  # the config.json section naming the transform that made a checkpoint

from . import MODEL_TYPE
from .attention import NAME, register, split_dim


@strict
class LlamaTapaConfig(LlamaConfig):
    """LlamaConfig plus θ (share of head dims that are amplitude) and α (distance exponent)."""

    model_type = MODEL_TYPE
    tapa_theta: float = 0.5
    tapa_alpha: float = 0.1

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        section = dict(getattr(self, CONFIG_KEY, None) or {})
        section.setdefault("transform", "tapa")
        setattr(self, CONFIG_KEY, section)

    def validate_architecture(self) -> None:
        super().validate_architecture()
        if self.tapa_alpha < 0:
            raise ValueError(f"tapa_alpha must be >= 0, got {self.tapa_alpha}")
        split_dim(self.head_dim or self.hidden_size // self.num_attention_heads, self.tapa_theta)


class LlamaTapaAttention(LlamaAttention):
    """Llama's attention module (same projections) with TAPA scores and no rotary embedding."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = cache if cache is not None else past_key_values
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = ALL_ATTENTION_FUNCTIONS[NAME](self, q, k, v, attention_mask,
                                                     dropout=self.attention_dropout if self.training else 0.0,
                                                     **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class LlamaTapaDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer built around `LlamaTapaAttention` (its forward is Llama's)."""

    def __init__(self, config: LlamaTapaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaTapaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class NoRotary(nn.Module):
    """Stands in for the rotary embedding: TAPA encodes position in the score, so there is no cos/sin."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
        return None


class LlamaTapaPreTrainedModel(LlamaPreTrainedModel):
    config_class = LlamaTapaConfig
    config: LlamaTapaConfig
    _no_split_modules = ["LlamaTapaDecoderLayer"]
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    _can_record_outputs = {"hidden_states": LlamaTapaDecoderLayer, "attentions": LlamaTapaAttention}

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Always "tapa": SDPA/flash kernels cannot compute the TAPA score, and the mask must be TAPA's."""
        if requested_attention not in (None, NAME, "eager", "sdpa"):
            raise ValueError(f"llama_tapa models only run attn_implementation={NAME!r} (asked for "
                             f"{requested_attention!r}): the TAPA score is not expressible in SDPA/flash kernels")
        return NAME


class LlamaTapaModel(LlamaTapaPreTrainedModel, LlamaModel):
    def __init__(self, config: LlamaTapaConfig):
        LlamaTapaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaTapaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = NoRotary()
        self.gradient_checkpointing = False
        self.post_init()


class LlamaTapaForCausalLM(LlamaTapaPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: LlamaTapaConfig):
        LlamaTapaPreTrainedModel.__init__(self, config)
        self.model = LlamaTapaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def register_model() -> None:
    """Make `llama_tapa` known to AutoConfig / AutoModelForCausalLM and register the attention. Idempotent."""
    register()
    AutoConfig.register(MODEL_TYPE, LlamaTapaConfig, exist_ok=True)
    AutoModelForCausalLM.register(LlamaTapaConfig, LlamaTapaForCausalLM, exist_ok=True)


def tapa_config(config: LlamaConfig | dict[str, Any], *, theta: float = 0.5, alpha: float = 0.1) -> LlamaTapaConfig:
    """A `llama_tapa` config with the shapes of a Llama config (object or dict); θ, α validated here.

    >>> tapa_config({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}).model_type
    'llama_tapa'
    """
    d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(key, None)
    d.update(tapa_theta=float(theta), tapa_alpha=float(alpha))
    try:
        return LlamaTapaConfig(**d)
    except Exception as e:  # huggingface_hub's strict-dataclass error wraps our ValueError
        cause = e.__cause__ if isinstance(e.__cause__, ValueError) else None
        if cause is None:
            raise
        raise ValueError(str(cause)) from None


def load_model(path: str | Path, *, dtype: Any = "auto") -> LlamaTapaForCausalLM:
    """Load a `llama_tapa` checkpoint folder (never as plain Llama, never with remote code)."""
    register_model()
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if cfg.model_type != MODEL_TYPE:
        from paramdelta.errors import CheckpointError

        raise CheckpointError(f"{path} is a {cfg.model_type!r} checkpoint, not {MODEL_TYPE!r}",
                              hint="convert it first: pdelta tapa retrofit CKPT --out OUT --train-data FILE")
    return LlamaTapaForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)


register_model()  # importing this module means transformers is loaded: make llama_tapa known now
