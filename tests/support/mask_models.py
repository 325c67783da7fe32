"""Mask-diffusion test models and references written from the published descriptions, not from canvasflow:

- `build_mask_checkpoint`: a tiny random LLaDA / Dream checkpoint in the published on-disk layout, optionally
  with EOS made likely (its head row aliased to a frequent token's, scaled up);
- `reference_logits`: the architecture as described (LLaMA-like pre-norm blocks, RMSNorm, RoPE over
  rotate-half, grouped-query attention without a causal mask, SwiGLU MLP; Dream's logits shifted right by
  one), computed from the safetensors by their published names, over a LEFT-PADDED batch with an attention
  mask and positions cumsum(mask) - 1, as LLaDA's and Dream's batched generation feed it;
- `reference_generate`: LLaDA's `generate` as its paper and code describe it: MASK-initialised answer,
  blocks left to right, per-block transfer counts (mask count split evenly over the block's steps, the
  remainder to the first steps), top-k of the confidence among masked positions of the current block,
  unsupervised classifier-free guidance. One deviation, shared with canvasflow and documented there: the
  MASK token's logit is set to -inf before predicting.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.models.tiny_mask import build_tiny_mask_model

NAMES = {
    "llada": {
        "embed": "model.transformer.wte.weight",
        "final_norm": "model.transformer.ln_f.weight",
        "head": "model.transformer.ff_out.weight",
        "layer": "model.transformer.blocks.{i}.",
        "attn_norm": "attn_norm.weight",
        "mlp_norm": "ff_norm.weight",
        "q": "q_proj",
        "k": "k_proj",
        "v": "v_proj",
        "o": "attn_out.weight",
        "gate": "ff_proj.weight",
        "up": "up_proj.weight",
        "down": "ff_out.weight",
    },
    "Dream": {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "head": "lm_head.weight",
        "layer": "model.layers.{i}.",
        "attn_norm": "input_layernorm.weight",
        "mlp_norm": "post_attention_layernorm.weight",
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj.weight",
        "gate": "mlp.gate_proj.weight",
        "up": "mlp.up_proj.weight",
        "down": "mlp.down_proj.weight",
    },
}


def build_mask_checkpoint(
    out_dir: Path, *, family: str = "llada", seed: int = 0, std: float = 0.02, eos_like: int | None = None
) -> Path:
    """A random tiny checkpoint; `eos_like`: EOS's head row becomes 1.2 x that token's, so EOS is predicted
    where that token would be (rows then end early, as an Instruct model's do)."""
    path = build_tiny_mask_model(out_dir, family=family, seed=seed, std=std)
    if eos_like is not None:
        config = json.loads((path / "config.json").read_text())
        tensors = load_file(str(path / "model.safetensors"))
        head = NAMES[config["model_type"]]["head"]
        tensors[head][config["eos_token_id"]] = tensors[head][eos_like] * 1.2
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def with_distinct_norms(source: Path, target: Path, seed: int = 1) -> Path:
    """A copy of checkpoint `source` at `target` whose norm weights are 1 + 0.5 N(0, 1) each. The tiny
    checkpoints' norms are all ones, under which a norm read under another's published name computes the same
    function."""
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name in [n for n in tensors if "norm" in n]:
        tensors[name] = 1 + 0.5 * torch.randn(tensors[name].shape, generator=gen)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class ReferenceModel:
    """Logits of a LLaDA or Dream checkpoint for a left-padded batch (see module docstring), in float64."""

    def __init__(self, model_dir: Path) -> None:
        self.config = json.loads((Path(model_dir) / "config.json").read_text())
        self.w = {k: v.double() for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}
        self.names = NAMES[self.config["model_type"]]
        c = self.config
        if c["model_type"] == "llada":
            self.layers, self.heads, self.kv_heads = c["n_layers"], c["n_heads"], c["n_kv_heads"]
            self.eps, self.shift = c["rms_norm_eps"], False
        else:
            self.layers, self.heads = c["num_hidden_layers"], c["num_attention_heads"]
            self.kv_heads, self.eps, self.shift = c["num_key_value_heads"], c["rms_norm_eps"], True
        self.theta = c["rope_theta"]

    def _linear(self, x: torch.Tensor, prefix: str, name: str) -> torch.Tensor:
        out = x @ self.w[prefix + name + ".weight"].T
        bias = self.w.get(prefix + name + ".bias")
        return out if bias is None else out + bias

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = self.names
        batch, length = ids.shape
        h = self.w[n["embed"]][ids]
        hidden = h.shape[-1]
        head_dim = hidden // self.heads
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0).double()  # [B, T]
        inv = 1.0 / self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = positions[..., None] * inv
        angles = torch.cat((angles, angles), -1)[:, None]  # [B, 1, T, d]
        cos, sin = angles.cos(), angles.sin()
        key_bias = torch.where(attention_mask.bool(), 0.0, float("-inf")).double()[:, None, None, :]
        for i in range(self.layers):
            p = n["layer"].format(i=i)
            x = _rms(h, self.w[p + n["attn_norm"]], self.eps)
            q = self._linear(x, p, n["q"]).view(batch, length, self.heads, head_dim).transpose(1, 2)
            k = self._linear(x, p, n["k"]).view(batch, length, self.kv_heads, head_dim).transpose(1, 2)
            v = self._linear(x, p, n["v"]).view(batch, length, self.kv_heads, head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            groups = self.heads // self.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + key_bias
            out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, hidden)
            h = h + out @ self.w[p + n["o"]].T
            x = _rms(h, self.w[p + n["mlp_norm"]], self.eps)
            h = (
                h
                + (F.silu(x @ self.w[p + n["gate"]].T) * (x @ self.w[p + n["up"]].T))
                @ self.w[p + n["down"]].T
            )
        h = _rms(h, self.w[n["final_norm"]], self.eps)
        logits = h @ self.w.get(n["head"], self.w[n["embed"]]).T
        if self.shift:  # Dream: position p is predicted from the hidden state of p - 1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


def transfer_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps]: the block's masked count split evenly, the remainder to the first steps (LLaDA)."""
    count = masked.sum(dim=1, keepdim=True)
    counts = torch.zeros(masked.shape[0], steps, dtype=torch.long) + count // steps
    for row in range(masked.shape[0]):
        counts[row, : int(count[row] % steps)] += 1
    return counts


def left_padded(
    prompts: list[list[int]], gen_length: int, *, mask_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, attention mask) [B, longest + gen_length]: the prompts right-aligned after pad tokens (mask
    0), then gen_length MASK tokens, as the references' batched generation lays a batch out."""
    longest = max(len(p) for p in prompts)
    x = torch.full((len(prompts), longest + gen_length), mask_id, dtype=torch.long)
    attention = torch.ones_like(x)
    for row, prompt in enumerate(prompts):
        x[row, : longest - len(prompt)] = pad_id
        attention[row, : longest - len(prompt)] = 0
        x[row, longest - len(prompt) : longest] = torch.tensor(prompt)
    return x, attention


def reference_generate(
    model: ReferenceModel,
    prompts: list[list[int]],
    *,
    gen_length: int,
    steps: int,
    block_length: int,
    mask_id: int,
    pad_id: int,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
) -> list[list[int]]:
    """LLaDA's generate over a left-padded batch; returns each row's generated tokens (gen_length)."""
    x, attention = left_padded(prompts, gen_length, mask_id=mask_id, pad_id=pad_id)
    batch, longest = len(prompts), x.shape[1] - gen_length
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :longest] = True
    blocks = gen_length // block_length
    per_block = steps // blocks
    for block in range(blocks):
        lo, hi = longest + block * block_length, longest + (block + 1) * block_length
        counts = transfer_counts(x[:, lo:hi] == mask_id, per_block)
        for step in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[prompt_index] = mask_id
                both = model(torch.cat([x, uncond]), torch.cat([attention, attention]))
                cond, un = both.chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x, attention)
            logits[..., mask_id] = float("-inf")
            x0 = logits.argmax(-1)
            p = logits.softmax(-1)
            if remasking == "low_confidence":
                conf = p.gather(-1, x0[..., None]).squeeze(-1)
            elif remasking == "margin":
                top = p.topk(2, dim=-1).values
                conf = top[..., 0] - top[..., 1]
            else:  # entropy: the negative entropy, higher = more confident
                conf = (p * torch.log(p.clamp_min(1e-300))).sum(-1)
            conf[:, hi:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, float("-inf"))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(batch):
                _, chosen = torch.topk(conf[row], k=int(counts[row, step]))
                transfer[row, chosen] = True
            x[transfer] = x0[transfer]
    return x[:, longest:].tolist()


def until_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], str]:
    """A completion as canvasflow reports it: the tokens before the first EOS, and the finish reason."""
    cut = next((i for i, t in enumerate(tokens) if t in eos), None)
    return (tokens, "length") if cut is None else (tokens[:cut], "eos")
