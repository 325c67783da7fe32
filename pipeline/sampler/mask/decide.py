"""One step's decisions of the mask sampler on a block of logits: pure torch, batched over rows, no host sync.

For rows with block logits z [B, K, V] and current block tokens [B, K] (MASK where undecided), with the MASK
token's logit set to -inf (a prediction of MASK would commit nothing; a trained model gives it no mass, and
LLaDA's `generate` would leave such a position masked, an untrained one could stall a block):
  1. prediction x0 and the confidence of each masked position (-inf elsewhere), by the settings' algorithm:
       llada  x0 = argmax(z + temperature * Gumbel) (argmax(z) at temperature 0): LLaDA's Gumbel-max,
              `exp(z) / (-log u)^T`, written in log space; confidence p[x0] with p = softmax(z)
              (low_confidence: LLaDA's, the probability under the logits without noise or temperature),
              p_top1 - p_top2 (margin) or sum p log p (entropy: negative entropy) with
              p = softmax(z / temperature) (Dream's `topk_margin` and `entropy` score the distribution they
              sample from; softmax(z) at temperature 0), or a keyed uniform (random);
       dream  Dream's `sample_tokens`: q = softmax of z / temperature (z at temperature 0) after its top_p and
              top_k filters; x0 drawn from q (keyed Gumbel-max; argmax at temperature 0); confidence q[x0],
              q_top1 - q_top2 or sum q log(q + 1e-10), or a keyed uniform (random);
  2. transfer, the positions committed:
       threshold  every masked position with confidence >= threshold, and at least the most confident
                  (Fast-dLLM), under either algorithm;
       llada      the k most confident masked positions, k = ceil(masked / steps left): exactly LLaDA's
                  `get_num_transfer_tokens` split of the block (base + 1 for the first `remainder` steps, then
                  base);
       dream      k = int(masked * (1 - s / t)) (all at the block's last step), t and s the step's points of
                  linspace(1, eps, steps + 1) in float32 as Dream computes them: the k most confident, or with
                  alg_temp > 0 k drawn without replacement in proportion to softmax(confidence / alg_temp)
                  (Gumbel-top-k, which has that distribution); `origin`: each masked position with probability
                  1 - s / t (keyed uniform), all at the last step;
  3. optional self-correction: tokens committed in earlier steps whose probability p[token] under softmax(z)
     fell below `remask_threshold` are masked again, the least probable first, fewer than were committed this
     step.
Ties between equal confidences go to the lower position (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.kernels import rng
from pipeline.sampler.mask.settings import MaskSettings

STREAM_MASK_SAMPLE = rng.STREAM_MASK_SAMPLE
STREAM_MASK_ORDER = rng.STREAM_MASK_ORDER
STREAM_MASK_PICK = rng.STREAM_MASK_PICK


@dataclass
class StepKeys:
    """What a row's draws of this step are keyed by: row key words, block index, step in the block, and the
    positions of the block within the generated region (all [B] or [B, K] int64)."""

    k0: torch.Tensor
    k1: torch.Tensor
    block: torch.Tensor
    step: torch.Tensor
    gen_positions: torch.Tensor  # [B, K]

    def rows(self, lo: int, hi: int) -> StepKeys:
        """The keys of rows lo..hi-1."""
        return StepKeys(
            self.k0[lo:hi], self.k1[lo:hi], self.block[lo:hi], self.step[lo:hi], self.gen_positions[lo:hi]
        )

    def words(self, stream: int) -> torch.Tensor:
        state = rng.row_state(self.k0, self.k1, stream, self.block, self.step)  # [B]
        return rng.absorb(state[:, None], self.gen_positions)  # [B, K]


@dataclass
class StepDecision:
    tokens: torch.Tensor  # [B, K] the block after this step
    transferred: torch.Tensor  # [B, K] bool, positions committed this step
    remasked: torch.Tensor  # [B, K] bool, committed tokens masked again


def predict(logits: torch.Tensor, temperature: float, keys: StepKeys | None) -> torch.Tensor:
    """x0 [B, K]: argmax of the logits, or of logits + temperature * keyed Gumbel noise (LLaDA's)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    vocab = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.int64)
    noise = rng.gumbel(keys.words(STREAM_MASK_SAMPLE), vocab)  # [B, K, V] float32
    return (logits + temperature * noise.to(logits.dtype)).argmax(dim=-1)


def confidence(
    probs: torch.Tensor, x0: torch.Tensor, rule: str, keys: StepKeys | None = None, entropy_eps: float = 0.0
) -> torch.Tensor:
    """[B, K] confidence of each prediction under `rule` (higher = commit first). `entropy_eps`: 0 for
    p log p with 0 log 0 = 0; Dream's 1e-10 for p log(p + 1e-10)."""
    if rule == "low_confidence":
        return probs.gather(-1, x0[..., None]).squeeze(-1)
    if rule == "margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if rule == "entropy":
        inner = probs + entropy_eps if entropy_eps else probs.clamp_min(torch.finfo(probs.dtype).tiny)
        return (probs * torch.log(inner)).sum(-1)
    if rule == "random":
        return rng.uniform(keys.words(STREAM_MASK_ORDER)).to(probs.dtype)
    if rule == "origin":  # no ranking: the positions are drawn (dream_transfer)
        return torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    raise ValueError(f"remasking={rule!r} is not one of low_confidence, margin, entropy, random, origin")


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose probability reaches top_p (the first always kept); the
    others' logits -inf."""
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    beyond = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1) > top_p
    beyond = torch.cat(
        [torch.zeros_like(beyond[..., :1]), beyond[..., :-1]], dim=-1
    )  # keeps the crossing one
    return logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top_k largest logits (and any equal to the k-th) kept, the others -inf."""
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def dream_predict(
    logits: torch.Tensor, s: MaskSettings, keys: StepKeys | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, confidence) [B, K] as Dream's `sample_tokens` (module docstring, step 1)."""
    z = logits / s.temperature if s.temperature > 0 else logits
    if s.top_p is not None and s.top_p < 1:
        z = filter_top_p(z, s.top_p)
    if s.top_k is not None:
        z = filter_top_k(z, s.top_k)
    probs = torch.softmax(z, dim=-1)
    if s.temperature > 0:
        vocab = torch.arange(z.shape[-1], device=z.device, dtype=torch.int64)
        x0 = (z + rng.gumbel(keys.words(STREAM_MASK_SAMPLE), vocab).to(z.dtype)).argmax(dim=-1)
    else:
        x0 = probs.argmax(dim=-1)
    return x0, confidence(probs, x0, s.remasking, keys, entropy_eps=1e-10)


def dream_transfer(
    conf: torch.Tensor, masked: torch.Tensor, step: torch.Tensor, s: MaskSettings, keys: StepKeys | None
) -> torch.Tensor:
    """[B, K] bool: the positions Dream's schedule commits at step `step` [B] of the block (module docstring)."""
    steps = s.steps_per_block
    points = torch.linspace(1, s.eps, steps + 1, device=conf.device)  # float32, as Dream's timesteps
    i = step.clamp(max=steps - 1)
    fraction = 1 - points[i + 1] / points[i]  # [B]
    last = step >= steps - 1
    if s.remasking == "origin":
        drawn = rng.uniform(keys.words(STREAM_MASK_ORDER)) < fraction[:, None]
        return masked & (drawn | last[:, None])
    count = masked.sum(-1)
    k = torch.where(last, count, (count.to(torch.float32) * fraction).long())  # int(): toward zero
    score = conf
    if s.alg_temp > 0:
        score = conf / s.alg_temp + -torch.log(-torch.log(rng.uniform(keys.words(STREAM_MASK_PICK))))
    return masked & (ranks(torch.where(masked, score, float("-inf"))) < k[:, None])


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
    settings: MaskSettings,
    step: torch.Tensor,
    allow_remask: torch.Tensor,
    keys: StepKeys | None,
) -> StepDecision:
    """logits [B, K, V] (float32/64), block [B, K] current tokens, step [B] steps taken in the block before
    this one, allow_remask [B] bool; `keys` when settings.draws_random_numbers. See the module docstring."""
    s = settings
    masked = block == s.mask_token_id  # [B, K]
    logits = logits.index_fill(-1, torch.tensor([s.mask_token_id], device=logits.device), float("-inf"))
    probs = torch.softmax(logits, dim=-1) if s.algorithm == "llada" or s.remask_threshold > 0 else None
    if s.algorithm == "dream":
        x0, conf = dream_predict(logits, s, keys)
    else:
        x0 = predict(logits, s.temperature, keys)
        scored = probs
        if s.temperature > 0 and s.remasking in (
            "margin",
            "entropy",
        ):  # Dream's sample_tokens: softmax(z / T)
            scored = torch.softmax(logits / s.temperature, dim=-1)
        conf = confidence(scored, x0, s.remasking, keys)
    conf = torch.where(masked, conf, float("-inf"))
    if s.threshold is not None:
        transfer = masked & ((conf >= s.threshold) | (ranks(conf) == 0))
    elif s.algorithm == "dream":
        transfer = dream_transfer(conf, masked, step, s, keys)
    else:
        steps_left = (s.steps_per_block - step).clamp_min(1)
        k = torch.div(
            masked.sum(-1) + steps_left - 1, steps_left, rounding_mode="floor"
        )  # ceil(masked / left)
        transfer = masked & (ranks(conf) < k[:, None])
    tokens = torch.where(transfer, x0, block)
    remasked = torch.zeros_like(masked)
    if s.remask_threshold > 0:
        kept = probs.gather(-1, block.clamp_min(0)[..., None]).squeeze(-1)  # p[token] of committed tokens
        candidates = ~masked & (kept < s.remask_threshold) & allow_remask[:, None]
        budget = transfer.sum(-1) - 1  # net progress of at least one token per step
        order = ranks(torch.where(candidates, -kept, float("-inf")))
        remasked = candidates & (order < budget[:, None])
        tokens = torch.where(remasked, s.mask_token_id, tokens)
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
