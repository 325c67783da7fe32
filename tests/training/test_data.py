"""Training data: encoding matches inference, the stream is train-only and seeded, batches need no padding."""

import itertools

import pytest
import torch

from pipeline.models.tiny import EOS_ID, PAD_ID, build_tokenizer
from pipeline.tasks.generators import is_held_out
from pipeline.training.config import TaskMix
from pipeline.training.data import (
    Example,
    bucket_by_length,
    collate,
    encode_examples,
    encode_prompt,
    encode_target,
    train_batches,
    train_instances,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prompt_is_the_pipelines_chat_rendering(tokenizer):
    from pipeline.data.prompts import prompt_ids

    ids = encode_prompt(tokenizer, "Add: 482+519")
    assert ids == prompt_ids(tokenizer, "Add: 482+519", is_chat=False, apply_chat_template=True)
    text = tokenizer.decode(ids)
    assert text == "<bos><start_of_turn>user\nAdd: 482+519<end_of_turn>\n<start_of_turn>model\n"
    assert len(ids) == 16 + len("Add: 482+519")  # character tokens plus the template's 16


def test_target_is_answer_eos_then_pad(tokenizer):
    target = encode_target(tokenizer, "1001", 32)
    assert len(target) == 32
    assert tokenizer.decode(target[:4]) == "1001"
    assert target[4] == EOS_ID
    assert set(target[5:]) == {PAD_ID}
    with pytest.raises(ValueError, match="needs 33 tokens"):
        encode_target(tokenizer, "x" * 32, 32)


def test_stream_is_seeded_and_never_yields_held_out_prompts():
    mix = TaskMix()
    first = list(itertools.islice(train_instances(3, mix), 3000))
    again = list(itertools.islice(train_instances(3, mix), 3000))
    other = list(itertools.islice(train_instances(4, mix), 3000))
    assert first == again
    assert first != other
    assert not any(is_held_out(inst.prompt) for inst in first)
    tasks = [inst.task for inst in first]
    assert 0.75 < tasks.count("addition") / len(tasks) < 0.85  # weights 0.8 / 0.1 / 0.1
    three_digit = [i for i in first if i.task == "addition" and len(i.prompt) == len("Add: 123+456")]
    assert len(three_digit) / tasks.count("addition") > 0.7  # 0.75 forced + the random 3+3 draws (1/16)


def test_mix_weights_select_tasks():
    only_sort = list(itertools.islice(train_instances(0, TaskMix(addition=0, sort=1, reverse=0)), 200))
    assert {inst.task for inst in only_sort} == {"sort"}


def _example(length: int, tag: int) -> Example:
    return Example(task=str(tag), prompt_ids=(tag,) * length, target=(0,) * 4)


def test_buckets_hold_one_length_and_keep_every_example_in_order():
    lengths = [3, 5, 3, 4, 5, 3, 5, 4, 4, 3, 7]
    examples = [_example(n, i) for i, n in enumerate(lengths)]
    batches = list(bucket_by_length(iter(examples), 3))
    assert [[int(e.task) for e in b] for b in batches] == [[0, 2, 5], [1, 4, 6], [3, 7, 8]]
    for batch in batches:
        assert len({len(e.prompt_ids) for e in batch}) == 1
    with pytest.raises(ValueError, match="batch_size=0"):
        list(bucket_by_length(iter(examples), 0))


def test_collate_refuses_mixed_lengths():
    with pytest.raises(ValueError, match=r"one prompt length.*\[3, 4\]"):
        collate([_example(3, 0), _example(4, 1)])
    batch = collate([_example(3, 0), _example(3, 1)])
    assert batch.prompt_ids.shape == (2, 3) and batch.target.shape == (2, 4)


def test_train_batches_match_per_example_encoding(tokenizer):
    batches = train_batches(tokenizer, seed=0, mix=TaskMix(), batch_size=8, canvas_length=32)
    batch = next(batches)
    assert batch.prompt_ids.dtype == torch.long and batch.target.shape == (8, 32)
    examples = list(itertools.islice(encode_examples(train_instances(0, TaskMix()), tokenizer, 32), 400))
    same_length = [e for e in examples if len(e.prompt_ids) == batch.prompt_ids.shape[1]][:8]
    assert batch.prompt_ids.tolist() == [list(e.prompt_ids) for e in same_length]
    assert batch.target.tolist() == [list(e.target) for e in same_length]
