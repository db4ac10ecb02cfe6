"""A tiny Llama-3-shaped model (vocabulary 128,256) with the real Llama 3 tokenizer, fine-tuned in
`llama3` format (a system message included), is a working Llama 3 chat model both ways:
`launch/sample.py --greedy --repetition_penalty 1.0` answers in the checkpoint's format (no
--format given), and the `--to hf` export loaded by `AutoTokenizer` + `apply_chat_template` +
`generate` gives the same answer and stops at `<|eot_id|>` by itself. Needs ../shared/llama3."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from lima_jax import model_store
from lima_jax.convert import export_hf
from lima_jax.data.chat_format import encode
from lima_jax.data.conversation import Conversation
from lima_jax.data.tokenizer import load_tokenizer
from lima_jax.model import init_params
from tests.convert_fixtures import sample_cli
from tests.test_export_chat import CFG, TRAIN
from tests.train_fixtures import fit_to_answers

CFG3 = dataclasses.replace(CFG, vocab_size=128256, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_multiple=128)
SYSTEM = "Answer in one sentence."
CONVS = [Conversation(tuple(TRAIN[0])), Conversation(tuple(TRAIN[1]), system=SYSTEM), Conversation(tuple(TRAIN[3]))]
EOT, MAX_NEW = 128009, 24


def train(tok, steps: int = 150) -> dict:
    """Fit CFG3 to CONVS with LIMA's loss (answers and their <|eot_id|>). A 128,256-way head each
    step would cost minutes on CPU, so a model over just the ids the conversations use is trained
    and its embedding rows and head columns are put at those ids of the full model; the other
    ids keep their small random logits (the greedy answers below show they lose)."""
    encoded = [encode(conv, tok, "llama3") for conv in CONVS]
    used = np.unique(np.concatenate([ids for ids, _ in encoded]))
    small = dataclasses.replace(CFG3, vocab_size=len(used), vocab_multiple=8)
    params = fit_to_answers(small, [(np.searchsorted(used, ids), w) for ids, w in encoded], steps)  # ids among the used
    full = jax.tree.map(np.array, jax.device_get(init_params(CFG3, jax.random.key(1))))
    full["embed"][used] = params["embed"][:len(used)]
    full["lm_head"][:, used] = params["lm_head"][:, :len(used)]
    return {**params, "embed": full["embed"], "lm_head": full["lm_head"]}


@pytest.fixture(scope="module")
def exported(shared_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    tok = load_tokenizer(str(shared_dir / "llama3" / "tokenizer.json"))
    meta = model_store.CheckpointMeta(model=CFG3, step=150, eot_id=EOT, tokenizer=tok.to_record(),
                                      chat_format="llama3", source={"trained": "tests/test_llama3_chat.py"})
    model_store.save_params(path / "ckpt", train(tok), meta)
    export_hf(path / "ckpt", path / "hf")
    return path


def test_export_configs(exported):
    config = json.loads((exported / "hf" / "config.json").read_text())
    generation = json.loads((exported / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == [128001, EOT]
    assert config["bos_token_id"] == 128000 and config["vocab_size"] == 128256


@pytest.mark.parametrize("conv", [CONVS[1], Conversation(tuple(TRAIN[3][:3]))], ids=["system", "multi_turn"])
def test_generate_answers_as_sample_py_and_stops_at_eot_id(exported, conv):
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(exported / "hf").eval()
    turns = conv.turns[:len(conv.turns) - (len(conv.turns) % 2 == 0)]  # up to the last user turn
    msgs = ([{"role": "system", "content": conv.system}] if conv.system else []) + \
        [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    prompt = list(hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
    with torch.no_grad():  # the exported generation config supplies the stop ids
        out = model.generate(torch.tensor([prompt]), do_sample=False, repetition_penalty=1.0,
                             max_new_tokens=MAX_NEW, pad_token_id=128001)[0, len(prompt):].tolist()
    assert out[-1] == EOT and EOT not in out[:-1] and len(out) < MAX_NEW  # stopped at <|eot_id|> by itself
    hf_answer = hf_tok.decode(out, skip_special_tokens=True)
    trained = next(c.turns for c in CONVS if c.turns[:len(turns)] == turns)[len(turns)]
    assert hf_answer == trained

    system = [f"--system={conv.system}"] if conv.system else []
    answer, count = sample_cli(exported / "ckpt", turns[-1], *system, turns=turns[:-1], fmt=None, max_new=MAX_NEW)
    assert (answer, count) == (hf_answer, len(out) - 1)
