"""The built-in tiny DiffusionGemma-architecture model: config, character tokenizer, checkpoint builder.

The checkpoint is written in the standard Hugging Face layout (config.json, model.safetensors,
tokenizer.json + tokenizer_config.json with a chat template, generation_config.json) by transformers'
own `DiffusionGemmaForBlockDiffusion`, so it is loaded by exactly the code that loads a real checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
# Printable ASCII plus newline and tab: every character of the shipped prompts and of the tiny tasks.
CHARACTERS = "\n\t" + "".join(chr(c) for c in range(32, 127))

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_vocab() -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    return vocab


def build_tokenizer(out_dir: str | os.PathLike[str]) -> Any:
    """Writes a character-level fast tokenizer with a Gemma-style chat template to `out_dir`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab()
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_text_config(**overrides: Any) -> dict[str, Any]:
    """Text config of the tiny model: the real architecture (sliding + global layers with k=v, MoE next to
    a dense MLP, self-conditioning, soft-capped tied head), scaled down."""
    vocab_size = 128  # >= len(tiny_vocab()); a multiple of 64 keeps kernels' tiles regular
    config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "global_head_dim": 64,
        "num_global_key_value_heads": 1,
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 64,
        "max_position_embeddings": 1024,
        "final_logit_softcapping": 30.0,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
    }
    config.update(overrides)
    if config["vocab_size"] < len(tiny_vocab()):
        raise ValueError(
            f"vocab_size={config['vocab_size']} is smaller than the tokenizer ({len(tiny_vocab())})"
        )
    return config


TINY_VISION_CONFIG: dict[str, Any] = {
    # DiffusionGemma carries a Gemma 4 vision tower; canvasflow is text-only, so it is as small as allowed.
    "model_type": "gemma4_vision",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "patch_size": 4,
    "position_embedding_size": 64,
}

TINY_GENERATION_CONFIG: dict[str, Any] = {
    "max_new_tokens": 64,
    "max_denoising_steps": 48,
    "t_min": 0.4,
    "t_max": 0.8,
    "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "eos_token_id": [EOS_ID],
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
}


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    canvas_length: int = 32,
    text_overrides: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Builds a randomly initialised tiny checkpoint (deterministic for a seed) in the HF layout."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(
        text_config=tiny_text_config(**(text_overrides or {})),
        vision_config=dict(TINY_VISION_CONFIG),
        canvas_length=canvas_length,
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    model.save_pretrained(str(out))
    build_tokenizer(out)
    write_generation_config(out, generation_config or TINY_GENERATION_CONFIG)
    return out


def write_generation_config(model_dir: str | os.PathLike[str], values: dict[str, Any]) -> None:
    with open(Path(model_dir) / "generation_config.json", "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2, sort_keys=True)
        f.write("\n")
