"""pipeline.data: batching by length, collation, prompt masking for the causal kinds."""

from __future__ import annotations

import random
from pathlib import Path


from pipeline import data
from pipeline.config import DataToTextData, InstructionData


def test_make_batches_covers_every_index_once_and_buckets_by_length():
    rng = random.Random(1)
    lengths = [rng.randint(3, 60) for _ in range(1000)]
    batches = data.make_batches(lengths, 32, shuffle=True, seed=0, bucketing=True)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_batches = data.make_batches(lengths, 32, shuffle=True, seed=0, bucketing=False)
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in random_batches)
    assert padded < 0.7 * padded_random  # bucketing is what makes CPU training ~2x faster
    # the batch order is shuffled, not sorted by length
    assert [max(lengths[i] for i in b) for b in batches] != sorted(max(lengths[i] for i in b) for b in batches)


def test_make_batches_gives_every_rank_the_same_count_and_disjoint_data():
    lengths = list(range(103))
    shards = [data.make_batches(lengths, 8, shuffle=True, seed=3, bucketing=True, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))
    assert data.steps_per_epoch(103, 8, 1, 3) == len(shards[0])


def test_collate_pads_and_masks_token_labels():
    examples = [data.Example([5, 6, 7], [-100, 6, 7], 3), data.Example([8], [8], 1)]
    batch = data.collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = data.collate([data.Example([1, 2], 1, 2), data.Example([3], 0, 1)], pad_token_id=0)
    assert cls["labels"].tolist() == [1, 0]


def test_instruction_and_data_to_text_mask_the_prompt(tiny_causal_model: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_model)
    spec = InstructionData(kind="instruction", train_path=tmp_path / "t.jsonl", eval_path=tmp_path / "e.jsonl",
                           max_seq_len=256)
    row = {"instruction": "Add two numbers.", "input": "2 and 3", "output": "5"}
    (example,) = data.tokenize_rows(spec, [row], tokenizer)
    prompt_len = sum(label == data.IGNORE_INDEX for label in example.labels)
    assert "### Response:" in tokenizer.decode(example.input_ids[:prompt_len])
    assert tokenizer.decode([t for t in example.labels if t != data.IGNORE_INDEX]) == "5</s>"
    assert "### Input:\n2 and 3" in tokenizer.decode(example.input_ids)
    (no_input,) = data.tokenize_rows(spec, [{**row, "input": ""}], tokenizer)
    assert "### Input" not in tokenizer.decode(no_input.input_ids)

    spec = DataToTextData(kind="data_to_text", train_path=tmp_path / "t.jsonl", eval_path=tmp_path / "e.jsonl")
    (example,) = data.tokenize_rows(spec, [{"mr": "name[The Eagle]", "ref": "The Eagle is a pub."}], tokenizer)
    target = tokenizer.decode([t for t in example.labels if t != data.IGNORE_INDEX])
    assert target == "The Eagle is a pub.</s>"
