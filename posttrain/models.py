"""Model factory: tiny models built from config (the tiny world), or any HF model dir / hub id.

Tiny configs live in ``recipes/model/*.yaml``. ``arch`` picks the transformers class:

  llama      LlamaForCausalLM            dense
  llama4     Llama4ForCausalLM (text)    interleaved MoE layers, shared + routed experts, top-1, NoPE layers
  qwen3_moe  Qwen3MoeForCausalLM         top-k softmax routing
  mixtral    MixtralForCausalLM

vLLM's CPU attention needs head_dim >= 32, so tiny configs keep hidden_size / num_attention_heads >= 32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from posttrain.config import ModelConfig
from posttrain.preflight import check_model_path
from posttrain.schema import ConfigError
from posttrain.tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _config_class(arch: str) -> Any:
    import transformers

    return {
        "llama": transformers.LlamaConfig,
        "llama4": transformers.Llama4TextConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "mixtral": transformers.MixtralConfig,
    }[arch]


def model_class(arch: str) -> Any:
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "llama4": transformers.Llama4ForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
        "mixtral": transformers.MixtralForCausalLM,
    }[arch]


def build_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if cfg.tokenizer == "char":
        return build_char_tokenizer()
    source = cfg.tokenizer or cfg.name_or_path
    if source is None:
        raise ConfigError("model.tokenizer is null and model.name_or_path is not set; name a tokenizer")
    check_model_path(source, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    return load_tokenizer(source)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """An HF tokenizer with the one pad rule applied (``ensure_pad_token``)."""
    return ensure_pad_token(AutoTokenizer.from_pretrained(str(source)))


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The one pad rule of every stage and engine: a tokenizer without a pad token (every Llama 3.x)
    pads with its EOS token. That is safe because nothing here finds padding by its id: batches carry
    attention masks, position ids and label masks built from the sequence lengths, so a real EOS is
    still attended to and trained on. A tokenizer with neither a pad nor an EOS token is refused."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an EOS token; "
                "training needs an EOS token (set eos_token in its tokenizer_config.json)"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def hf_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The transformers config of a tiny model (vocab and special ids come from the tokenizer)."""
    assert cfg.arch is not None
    kwargs = dict(cfg.config)
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("tie_word_embeddings", False)
    conf = _config_class(cfg.arch)(**kwargs)
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    if head_dim < 32:
        raise ConfigError(
            f"model.config: head_dim {head_dim} < 32 is not supported by vLLM's CPU attention; "
            "raise hidden_size or lower num_attention_heads"
        )
    return conf


def build_model(cfg: ModelConfig, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Initial model + tokenizer for the first stage of a recipe."""
    tokenizer = build_tokenizer(cfg)
    if cfg.name_or_path is not None:
        return load_model(cfg.name_or_path, cfg.dtype, key="model.name_or_path"), tokenizer
    conf = hf_config(cfg, tokenizer)
    torch.manual_seed(seed)
    model = model_class(cfg.arch or "llama")(conf).to(DTYPES[cfg.dtype])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def load_model(path: str, dtype: str = "float32", key: str = "checkpoint") -> PreTrainedModel:
    check_model_path(path, key)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as e:  # truncated or foreign weight files (safetensors, torch and OS errors alike)
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise ConfigError(
            f"{key}: '{path}' does not load as a Hugging Face causal LM ({first}); re-export it with save_pretrained"
        ) from None


def load_checkpoint(
    path: str | Path, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A stage's exported checkpoint (model + tokenizer in one HF dir)."""
    path = str(path)
    return load_model(path, dtype), load_tokenizer(path)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
