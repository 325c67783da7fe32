"""Where a row's random numbers come from.

KeyedDraws (production): every draw is a function of (seed, row id, canvas, step, position[, token]) through
the counter-based generator of pipeline.kernels.rng, so results do not depend on batching.

GlobalDraws (tests only): draws from torch's global generator with the same calls, shapes and order as
transformers' DiffusionGemma `generate` (randint for the canvas and the re-noise, multinomial over the
softmax for sampling), so that a static batch reproduces transformers token for token.
"""

from __future__ import annotations

import torch

from pipeline.kernels import rng


class KeyedDraws:
    keyed = True

    def __init__(self, vocab_size: int, canvas_length: int) -> None:
        self.vocab_size = vocab_size
        self.canvas_length = canvas_length

    def initial_canvas(self, k0: torch.Tensor, k1: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        state = rng.row_state(k0, k1, rng.STREAM_INIT, canvas, 0)
        return rng.uniform_tokens(rng.position_state(state, self.canvas_length), self.vocab_size)

    def noise(
        self, k0: torch.Tensor, k1: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor
    ) -> torch.Tensor:
        state = rng.row_state(k0, k1, rng.STREAM_RENOISE, canvas, step)
        return rng.uniform_tokens(rng.position_state(state, self.canvas_length), self.vocab_size)

    def sample_state(
        self, k0: torch.Tensor, k1: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor
    ) -> torch.Tensor:
        """Position words [B*L] for the Gumbel-max sampling of the vocabulary head."""
        state = rng.row_state(k0, k1, rng.STREAM_SAMPLE, canvas, step)
        return rng.position_state(state, self.canvas_length).reshape(-1)


class GlobalDraws:
    keyed = False

    def __init__(self, vocab_size: int, canvas_length: int) -> None:
        self.vocab_size = vocab_size
        self.canvas_length = canvas_length

    def initial_canvas(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.randint(low=0, high=self.vocab_size, size=(batch, self.canvas_length), device=device)

    def noise(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.randint(low=0, high=self.vocab_size, size=(batch, self.canvas_length), device=device)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [B, L, V] float32 -> [B, L], one multinomial call over the flattened positions."""
        batch, length, vocab = probs.shape
        return torch.multinomial(probs.view(-1, vocab), num_samples=1).squeeze(-1).view(batch, length)
