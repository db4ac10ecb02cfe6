"""The real LIMA train set with the real LLaMA tokenizer: counts, packing, loss mask, EOT.

Expectations are computed here from the raw jsonl and SentencePiece directly, not from the
pipeline's own helpers."""

import dataclasses
import json
import math

import numpy as np
import pytest
import sentencepiece as spm

from lima_jax.config import base_config
from lima_jax.data import pipeline as P
from lima_jax.sharding import batch_layout

EOT = 32000


@pytest.fixture(scope="module")
def raw(shared_dir):
    return [json.loads(line)["conversations"] for line in open(shared_dir / "lima" / "train.jsonl")]


@pytest.fixture(scope="module")
def sp(shared_dir):
    return spm.SentencePieceProcessor(model_file=str(shared_dir / "llama" / "tokenizer.model"))


@pytest.fixture(scope="module")
def cfg(shared_dir):
    c = base_config().data
    c.update(train_path=str(shared_dir / "lima" / "train.jsonl"),
             tokenizer_path=str(shared_dir / "llama" / "tokenizer.model"), examples_per_step=32)
    return c


@pytest.fixture(scope="module")
def data(cfg):
    return P.load_data(cfg, seed=0)


def test_counts_and_trimming(data, raw, sp):
    lengths = [1 + sum(len(sp.encode(t)) + 1 for t in turns) for turns in raw]
    assert len(raw) == 1000 and sum(lengths) == 714_132
    assert data.tokenizer.eot_id == EOT and data.tokenizer.vocab_size == 32001
    s = data.stats
    assert (s.lines, s.examples, s.dropped_final_turns, s.skipped_no_response, s.skipped_no_target) == (1000, 1000, 0, 0, 0)
    assert s.trimmed == sum(n > 2049 for n in lengths) == 69
    assert s.tokens == sum(min(n, 2049) for n in lengths)
    assert (len(data.train), len(data.dev)) == (950, 50)


def test_step_count_is_the_recipes_on_any_slice(data):
    """65B recipe (32 examples a step), 15 epochs: the same steps for 1, 32 and 128 batch
    shards (issue 16), each step exactly 32 examples but the last; the real batches of 2 epochs
    hold every train example twice."""
    plan = P.make_plan(data, 32, epochs=15)
    assert plan.total_steps == -(-950 * 15 // 32) == 446
    layouts = {shards: batch_layout(plan.rows_needed, 1, shards, shards, 2048) for shards in (1, 32, 128)}
    print(f"\n65B: {plan}; " + "; ".join(f"{k}: {v.describe(2048)}" for k, v in layouts.items()))
    assert {layout.rows for layout in layouts.values()} == {plan.rows_needed}  # no rows added for the mesh
    assert [layouts[s].context for s in (1, 32, 128)] == [1, 32 // math.gcd(plan.rows_needed, 32),
                                                           128 // math.gcd(plan.rows_needed, 128)]
    plan2 = dataclasses.replace(P.make_plan(data, 32, epochs=2), rows_per_step=plan.rows_needed)
    real, examples = 0, []
    for b in P.train_iterator(data, plan2):
        real += int((b["segment_ids"] > 0).sum())
        examples.append(int(b["examples"]))
    assert examples == [32] * (len(examples) - 1) + [950 * 2 - 32 * (len(examples) - 1)]
    assert len(examples) == plan2.total_steps == -(-950 * 2 // 32)
    assert real == 2 * sum(len(e["ids"]) - 1 for e in data.train) == plan2.real_tokens


def test_loss_mask_eot_and_segments(data, cfg, raw, sp):
    plan = P.make_plan(data, 32, epochs=1)
    plan = dataclasses.replace(plan, rows_per_step=plan.rows_needed)
    answer = {q: a for q, a in raw}
    checked = 0
    for b, _ in zip(P.train_iterator(data, plan), range(4)):
        for row in range(plan.rows_per_step):
            seg, pos = b["segment_ids"][row], b["positions"][row]
            assert not b["loss_weights"][row][seg == 0].any()
            for s in np.unique(seg[seg > 0]):
                idx = np.flatnonzero(seg == s)
                # one contiguous segment per example, positions from 0: the model's equal-segment
                # causal mask then keeps attention inside the example
                assert (np.diff(idx) == 1).all() and (pos[idx] == np.arange(len(idx))).all()
                tok, tgt, w = b["tokens"][row][idx], b["targets"][row][idx], b["loss_weights"][row][idx]
                np.testing.assert_array_equal(tok[1:], tgt[:-1])  # targets are next tokens
                assert tok[0] == 1
                eots = np.flatnonzero(tgt == EOT)
                prompt = sp.decode(tok[1:eots[0] + 1].tolist())
                assert prompt in answer
                if len(idx) == 2048:  # trimmed: no closing EOT
                    assert len(eots) == 1 and w[eots[0] + 1:].all()
                    continue
                # EOT after the prompt (no loss) and after the response (loss), nowhere else
                assert eots.tolist() == [len(sp.encode(prompt)), len(idx) - 1]
                assert w[eots[0]] == 0 and w[-1] == 1
                assert not w[:eots[0] + 1].any() and w[eots[0] + 1:].all()
                masked_in = tgt[w == 1]
                if sp.decode(sp.encode(answer[prompt])) == answer[prompt]:
                    assert sp.decode(masked_in[:-1].tolist()) == answer[prompt]
                    checked += 1
    assert checked > 50
