"""LLaDA's masked-diffusion objective: what is masked, how the loss is weighted, and that it trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.bidirectional import BidirectionalLM
from pipeline.models.tiny_mask import init_weights, tiny_spec
from pipeline.training.mask_objective import masked_diffusion_loss


def _model(family: str = "llada") -> BidirectionalLM:
    model = BidirectionalLM(tiny_spec(family, hidden_size=32, intermediate_size=64))
    init_weights(model, torch.Generator().manual_seed(0), std=0.05)
    return model


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, 100, (4, 7), generator=gen), torch.randint(10, 100, (4, 12), generator=gen)


def test_loss_is_the_weighted_cross_entropy_of_masked_answer_positions():
    model = _model()
    prompt, target = _batch()
    out = masked_diffusion_loss(model, prompt, target, torch.Generator().manual_seed(3))
    # replay the draws: the same generator order gives the same mask
    gen = torch.Generator().manual_seed(3)
    p = (1 - 1e-3) * torch.rand(4, generator=gen) + 1e-3
    masked = torch.rand(4, 12, generator=gen) < p[:, None]
    assert torch.equal(out.masked, masked) and torch.allclose(out.p_mask, p)
    tokens = torch.cat([prompt, torch.where(masked, model.mask_token_id, target)], 1)
    logits = model.logits(
        model(tokens, torch.arange(19).expand(4, -1), torch.ones_like(tokens, dtype=torch.bool))
    )
    ce = F.cross_entropy(logits[:, 7:].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    expected = (ce.view(4, 12) * masked / p[:, None]).sum() / 48
    torch.testing.assert_close(out.loss, expected)


def test_dream_is_trained_on_shifted_positions():
    model = _model("dream")
    prompt, target = _batch(1)
    out = masked_diffusion_loss(model, prompt, target, torch.Generator().manual_seed(0))
    tokens = torch.cat([prompt, torch.where(out.masked, model.mask_token_id, target)], 1)
    logits = model.logits(
        model(tokens, torch.arange(19).expand(4, -1), torch.ones_like(tokens, dtype=torch.bool))
    )
    ce = F.cross_entropy(logits[:, 6:18].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    torch.testing.assert_close(out.loss, (ce.view(4, 12) * out.masked / out.p_mask[:, None]).sum() / 48)


def test_a_few_steps_fit_a_fixed_batch():
    model = _model()
    prompt, target = _batch(2)

    def held_out_loss() -> float:  # the same masks before and after training
        with torch.no_grad():
            losses = [
                masked_diffusion_loss(model, prompt, target, torch.Generator().manual_seed(1000 + i)).loss
                for i in range(8)
            ]
        return float(sum(losses) / len(losses))

    before = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(100):
        out = masked_diffusion_loss(model, prompt, target, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.6 * before
