"""The real LIMA train set with the real LLaMA tokenizer: counts, packing, loss mask, EOT.

Expectations are computed here from the raw jsonl and SentencePiece directly, not from the
pipeline's own helpers."""

import json

import numpy as np
import pytest
import sentencepiece as spm

from lima_jax.config import base_config
from lima_jax.data import pipeline as P

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


def test_packing_efficiency_and_step_count(data, cfg):
    """65B recipe (32 examples/step), 15 epochs; the plan's dry run is checked against the real
    batches over 2 epochs (a full 15-epoch pass is the same code, 7x slower)."""
    plan = P.make_plan(data, cfg, epochs=15)
    print(f"\n65B: {plan}")
    assert plan.efficiency >= 0.95
    assert abs(plan.steps_per_epoch - 950 / 32) < 1.5  # LIMA's step count is kept
    plan2 = P.make_plan(data, cfg, epochs=2)
    real, steps = 0, 0
    for b in P.train_iterator(data, plan2):
        real += int((b["segment_ids"] > 0).sum())
        steps += 1
    assert steps == plan2.total_steps
    assert real == 2 * sum(len(e["ids"]) - 1 for e in data.train) == plan2.real_tokens
    assert real / (steps * plan2.rows_per_step * 2048) >= 0.95


def test_loss_mask_eot_and_segments(data, cfg, raw, sp):
    plan = P.make_plan(data, cfg, epochs=1)
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
