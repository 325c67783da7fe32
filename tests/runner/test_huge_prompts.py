"""A prompt far longer than max_prompt_tokens can hold is an error row without being tokenized; one just
over the limit is still measured in tokens."""

from __future__ import annotations

import re

from pipeline import LLM


def test_a_megabyte_prompt_is_rejected_untokenized_and_a_long_one_by_its_tokens():
    llm = LLM("builtin:tiny-diffusiongemma", max_new_tokens=16, max_denoising_steps=2)
    limit = llm.generator.max_prompt_tokens
    huge = "abc " * 2_000_000  # 8 MB
    long = "word " * (limit + 50)  # over the limit in tokens, within the character bound
    out = llm.generate([huge, long, "1+1="], ids=["huge", "long", "ok"])
    by_id = {c.id: c for c in out}
    assert re.search(r"has 8\d{6} characters", by_id["huge"].error) and "not tokenized" in by_id["huge"].error
    assert f" max_prompt_tokens={limit}" in by_id["huge"].error and "model." not in by_id["huge"].error
    assert "tokens, more than fit" in by_id["long"].error  # measured by the tokenizer, as before
    assert by_id["ok"].error is None and by_id["ok"].completion_tokens > 0
