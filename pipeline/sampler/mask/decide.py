"""One step's decisions of the mask sampler on a block of logits: pure torch, batched over rows, no host sync.

For rows with block logits z [B, K, V] and current block tokens [B, K] (MASK where undecided), with the MASK
token's logit set to -inf (a prediction of MASK would commit nothing; a trained model gives it no mass, and
LLaDA's `generate` would leave such a position masked, an untrained one could stall a block):
  1. prediction x0 = argmax(z + temperature * Gumbel) (argmax(z) at temperature 0): LLaDA's Gumbel-max,
     `exp(z) / (-log u)^T`, written in log space;
  2. confidence of each masked position: p[x0] with p = softmax(z) (low_confidence: LLaDA's, the
     probability under the logits without noise or temperature), p_top1 - p_top2 (margin) or sum p log p
     (entropy: negative entropy) with p = softmax(z / temperature) (Dream's `topk_margin` and `entropy`
     score the distribution they sample from; softmax(z) at temperature 0), or a keyed uniform (random);
     -inf elsewhere;
  3. transfer: the k most confident masked positions, k = ceil(masked / steps left) — exactly LLaDA's
     `get_num_transfer_tokens` split of the block (base + 1 for the first `remainder` steps, then base) — or,
     with a threshold, every masked position with confidence >= threshold and at least the most confident;
  4. optional self-correction: tokens committed in earlier steps whose probability p[token] fell below
     `remask_threshold` are masked again, the least probable first, fewer than were committed this step.
Ties between equal confidences go to the lower position (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.kernels import rng

STREAM_MASK_SAMPLE = rng.STREAM_MASK_SAMPLE
STREAM_MASK_ORDER = rng.STREAM_MASK_ORDER


@dataclass
class StepKeys:
    """What a row's draws of this step are keyed by: row key words, block index, step in the block, and the
    positions of the block within the generated region (all [B] or [B, K] int64)."""

    k0: torch.Tensor
    k1: torch.Tensor
    block: torch.Tensor
    step: torch.Tensor
    gen_positions: torch.Tensor  # [B, K]

    def words(self, stream: int) -> torch.Tensor:
        state = rng.row_state(self.k0, self.k1, stream, self.block, self.step)  # [B]
        return rng.absorb(state[:, None], self.gen_positions)  # [B, K]


@dataclass
class StepDecision:
    tokens: torch.Tensor  # [B, K] the block after this step
    transferred: torch.Tensor  # [B, K] bool, positions committed this step
    remasked: torch.Tensor  # [B, K] bool, committed tokens masked again


def predict(logits: torch.Tensor, temperature: float, keys: StepKeys | None) -> torch.Tensor:
    """x0 [B, K]: argmax of the logits, or of logits + temperature * keyed Gumbel noise."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    vocab = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.int64)
    noise = rng.gumbel(keys.words(STREAM_MASK_SAMPLE), vocab)  # [B, K, V] float32
    return (logits + temperature * noise.to(logits.dtype)).argmax(dim=-1)


def confidence(
    probs: torch.Tensor, x0: torch.Tensor, rule: str, keys: StepKeys | None = None
) -> torch.Tensor:
    """[B, K] confidence of each prediction under `rule` (higher = commit first)."""
    if rule == "low_confidence":
        return probs.gather(-1, x0[..., None]).squeeze(-1)
    if rule == "margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if rule == "entropy":
        return (probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1)
    if rule == "random":
        u = ((keys.words(STREAM_MASK_ORDER) >> 9).to(torch.float64) + 0.5) / 8388608.0
        return u.to(probs.dtype)
    raise ValueError(f"remasking={rule!r} is not one of low_confidence, margin, entropy, random")


def ranks(score: torch.Tensor) -> torch.Tensor:
    """rank[b, i] = place of score[b, i] in descending order (0 = highest; ties: lower index first)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    out = torch.empty_like(order)
    out.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return out


def decide(
    logits: torch.Tensor,
    block: torch.Tensor,
    *,
    mask_id: int,
    steps_left: torch.Tensor,
    rule: str,
    temperature: float,
    threshold: float | None,
    remask_threshold: float,
    allow_remask: torch.Tensor,
    keys: StepKeys | None,
) -> StepDecision:
    """logits [B, K, V] (float32/64), block [B, K] current tokens, steps_left [B] (>= 1) scheduled steps left
    in the block including this one, allow_remask [B] bool. See the module docstring."""
    masked = block == mask_id  # [B, K]
    logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    x0 = predict(logits, temperature, keys)
    probs = torch.softmax(logits, dim=-1)
    scored = probs
    if temperature > 0 and rule in ("margin", "entropy"):  # Dream's sample_tokens: softmax(z / T)
        scored = torch.softmax(logits / temperature, dim=-1)
    conf = torch.where(masked, confidence(scored, x0, rule, keys), float("-inf"))
    rank = ranks(conf)
    count = masked.sum(-1)  # [B]
    if threshold is None:
        k = torch.div(count + steps_left - 1, steps_left, rounding_mode="floor")  # ceil(count / steps_left)
        transfer = masked & (rank < k[:, None])
    else:
        transfer = masked & ((conf >= threshold) | (rank == 0))
    tokens = torch.where(transfer, x0, block)
    remasked = torch.zeros_like(masked)
    if remask_threshold > 0:
        kept = probs.gather(-1, block.clamp_min(0)[..., None]).squeeze(-1)  # p[token] of committed tokens
        candidates = ~masked & (kept < remask_threshold) & allow_remask[:, None]
        budget = transfer.sum(-1) - 1  # net progress of at least one token per step
        order = ranks(torch.where(candidates, -kept, float("-inf")))
        remasked = candidates & (order < budget[:, None])
        tokens = torch.where(remasked, mask_id, tokens)
    return StepDecision(tokens=tokens, transferred=transfer, remasked=remasked)


def eos_stop(
    generated: torch.Tensor, *, mask_id: int, eos_ids: torch.Tensor, final_end: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stop [B] bool, eos position [B]) for generated regions [B, G]: a row stops at its first EOS whose
    position is < final_end[b] (tokens there can no longer change) and before which every token is decided;
    its completion is then final. The position is G where there is none."""
    width = generated.shape[1]
    undecided = generated == mask_id
    decided_before = (torch.cumsum(undecided.long(), dim=1) - undecided.long()) == 0  # [B, G]
    within = torch.arange(width, device=generated.device)[None, :] < final_end[:, None]
    hit = torch.isin(generated, eos_ids) & ~undecided & decided_before & within
    position = torch.where(hit.any(-1), hit.long().argmax(-1), width)
    return hit.any(-1), position
