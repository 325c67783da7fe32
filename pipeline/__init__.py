"""canvasflow: synthetic text datasets with diffusion language models, at cluster scale.

from pipeline import LLM
llm = LLM()                                   # the built-in tiny DiffusionGemma-architecture model
for out in llm.generate(["Add: 482+519"]):
    print(out.completion, out.denoising_steps)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pipeline.llm import LLM, Completion


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the API is used, not for `--help` or config checks.
    if name in ("LLM", "Completion"):
        from pipeline import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["LLM", "Completion", "__version__"]
