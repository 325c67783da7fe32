"""Dream's `diffusion_generate` written from its published description (Dream-v0 `generation_utils.py`:
`_sample` and `sample_tokens`), not from canvasflow, over a left-padded batch (tests/support/mask_models.py
`ReferenceModel`, `left_padded`):

- the answer starts as max_new_tokens MASK tokens; timesteps = linspace(1, eps, steps + 1);
- each step i, on the logits of the whole sequence (Dream's shifted by one position), with t, s = timesteps[i],
  timesteps[i + 1]:
    alg "origin": each masked position is committed with probability 1 - s / t (1 at the last step), its
      token drawn by `sample_tokens`;
    alg "maskgit_plus" / "topk_margin" / "entropy": `sample_tokens` gives every masked position a token and a
      confidence (the probability of the token, top-1 minus top-2 probability, or sum p log(p + 1e-10));
      number_transfer_tokens = int(masked per row, batch average, * (1 - s / t)) (all at the last step);
      the top ones by confidence, or with alg_temp a multinomial draw without replacement from
      softmax(confidence / alg_temp), are committed;
- `sample_tokens`: logits / temperature (when > 0), the top_p filter (smallest set reaching top_p, the first
  crossing token kept), the top_k filter (both by filling with the dtype's minimum), softmax; a categorical
  draw (temperature > 0) or the most probable token.

The random draws go through a `Draws` object: `TorchDraws` makes them as Dream does (torch's generator);
`KeyedDraws` makes them from canvasflow's keyed numbers, so that a comparison is of decisions, token for
token. One deviation, shared with canvasflow and documented there: the MASK token's logit is set to -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.kernels import rng
from tests.support.mask_models import left_padded


class TorchDraws:
    """Dream's own draws: torch.rand, Categorical and multinomial on a seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def uniform(self, row: int, step: int, positions: torch.Tensor) -> torch.Tensor:
        return torch.rand(len(positions), generator=self.gen, dtype=torch.float64)

    def categorical(self, row: int, step: int, positions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)

    def without_replacement(
        self, row: int, step: int, positions: torch.Tensor, weights: torch.Tensor, count: int
    ) -> torch.Tensor:
        return torch.multinomial(weights, count, replacement=False, generator=self.gen)


class KeyedDraws:
    """The same draws from canvasflow's keyed random numbers (pipeline/kernels/rng.py) for rows "row-<i>" of
    seed `seed`, one block: a categorical draw is Gumbel-max over log-probabilities, a draw without
    replacement is Gumbel-top-k over log-weights (both exact in distribution)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _words(self, row: int, step: int, stream: int, positions: torch.Tensor) -> torch.Tensor:
        k0, k1 = rng.row_key(self.seed, f"row-{row}")
        one = torch.tensor([0], dtype=torch.int64)
        state = rng.row_state(one + k0, one + k1, stream, one, step)
        return rng.absorb(state, positions.to(torch.int64))

    def uniform(self, row: int, step: int, positions: torch.Tensor) -> torch.Tensor:
        return rng.uniform(self._words(row, step, rng.STREAM_MASK_ORDER, positions)).double()

    def categorical(self, row: int, step: int, positions: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        vocab = torch.arange(probs.shape[-1], dtype=torch.int64)
        noise = rng.gumbel(self._words(row, step, rng.STREAM_MASK_SAMPLE, positions), vocab).double()
        return (torch.log(probs) + noise).argmax(-1)

    def without_replacement(
        self, row: int, step: int, positions: torch.Tensor, weights: torch.Tensor, count: int
    ) -> torch.Tensor:
        u = rng.uniform(self._words(row, step, rng.STREAM_MASK_PICK, positions))
        return torch.topk(torch.log(weights) - torch.log(-torch.log(u)).double(), count).indices


def _categorical(draws, row: int, step: int, positions: torch.Tensor):
    return lambda probs: draws.categorical(row, step, positions, probs)


def sample_tokens(logits, temperature, top_p, top_k, confidence_of, draw):
    """(confidence, x0) for masked positions' logits [M, V], as Dream's `sample_tokens`."""
    if temperature > 0:
        logits = logits / temperature
    floor = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), floor)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, floor)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = draw(probs)
        confidence = probs.gather(-1, x0[:, None]).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if confidence_of == "topk_margin":
        ordered = torch.sort(probs, dim=-1, descending=True).values
        confidence = ordered[:, 0] - ordered[:, 1]
    elif confidence_of == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    steps: int,
    mask_id: int,
    pad_id: int,
    alg: str = "origin",
    eps: float = 1e-3,
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    draws=None,
) -> list[list[int]]:
    """Dream's generation over a left-padded batch; each row's max_new_tokens generated tokens."""
    draws = draws or TorchDraws()
    x, attention = left_padded(prompts, max_new_tokens, mask_id=mask_id, pad_id=pad_id)
    batch, longest = len(prompts), x.shape[1] - max_new_tokens
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x, attention)
        logits[..., mask_id] = float("-inf")
        t, s = timesteps[i], timesteps[i + 1]
        num_mask_token = mask_index.sum() / batch
        for row in range(batch):
            masked = mask_index[row].nonzero().flatten()
            if len(masked) == 0:
                continue
            gen = masked - longest  # positions within the answer: what the keyed draws are keyed by

            if alg == "origin":
                p_transfer = 1 - s / t if i < steps - 1 else 1
                chosen = draws.uniform(row, i, gen) < p_transfer
                if chosen.any():
                    _, x0 = sample_tokens(
                        logits[row, masked[chosen]], temperature, top_p, top_k, alg,
                        _categorical(draws, row, i, gen[chosen]),
                    )  # fmt: skip
                    x[row, masked[chosen]] = x0
                continue
            confidence, x0 = sample_tokens(
                logits[row, masked], temperature, top_p, top_k, alg, _categorical(draws, row, i, gen)
            )
            count = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            if count <= 0:
                continue
            if not alg_temp:
                picks = torch.topk(confidence, count).indices
            else:
                weights = torch.softmax(confidence / alg_temp, dim=-1)
                picks = draws.without_replacement(row, i, gen, weights, count)
            x[row, masked[picks]] = x0[picks]
    return x[:, longest:].tolist()
