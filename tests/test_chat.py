"""launch/chat.py driven through standard input on the tiny trained chat checkpoint of
tests/test_serving.py: multi-turn answers use the history, /reset forgets it, unknown
commands are named, /exit leaves; answers stream piece by piece and equal the Sampler's."""

import subprocess
import sys

import pytest

from lima_jax.sampling import SamplingSettings
from lima_jax.sampling.sampler import load_sampler
from lima_jax.serving.chat import Conversation
from tests.conftest import ROOT
from tests.test_export_chat import TRAIN
from tests.test_serving import build_checkpoint

GREEDY = SamplingSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=40)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt")


def test_chat_through_stdin(ckpt):
    first, follow_up = TRAIN[3][0], TRAIN[3][2]  # "What is 4 plus 4?", "And if I add 2 more?"
    typed = f"{first}\n{follow_up}\n/reset\n{follow_up}\n/bogus\n/exit\nnever read\n"
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "chat.py"), "--checkpoint", ckpt, "--greedy",
                             "--repetition_penalty", "1.0", "--max_new_tokens", "40"], input=typed, text=True,
                            capture_output=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    answers = [line.split("lima> ", 1)[1] for line in out.splitlines() if "lima> " in line]
    sampler = load_sampler(ckpt)[0]
    alone = sampler.answer([follow_up], GREEDY)["answer"]  # the follow-up without its history
    assert answers[:2] == [TRAIN[3][1], TRAIN[3][3]]  # the second answer needed the first exchange
    assert answers[2] == alone != TRAIN[3][3]  # /reset forgot it
    assert len(answers) == 3 and "[conversation reset]" in out and "unknown command /bogus" in out
    assert "never read" not in out


def test_answers_stream_in_pieces_and_join_the_history(ckpt):
    sampler = load_sampler(ckpt)[0]
    conversation = Conversation(sampler, GREEDY)
    pieces = []
    out = conversation.reply(TRAIN[3][0], stream=pieces.append)
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == out["answer"] == TRAIN[3][1]
    conversation.reply(TRAIN[3][2])
    assert conversation.turns == TRAIN[3]
    conversation.reset()
    assert conversation.turns == []


def test_system_message_is_refused_for_a_lima_checkpoint(ckpt):
    """LIMA's format has no system role: --system is refused before the model loads, saying so."""
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "chat.py"), "--checkpoint", ckpt,
                             "--system", "Be brief."], input="Hi\n", text=True, capture_output=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 2 and "'lima' chat format, which has no system role" in result.stderr
    assert "lima>" not in result.stdout
