"""The pieces under the server, without HTTP: the one text stream never releases a stop
string's start or half a character, and its pieces join to the final text; requests the cache
cannot hold are refused; model ids from checkpoint paths. (The per-row decoding transforms are
compared with Hugging Face's in tests/test_sampling.py.)"""

import pytest

from lima_jax.sampling.text import TextStream
from lima_jax.serving.server import model_name_from_path


class CharTokenizer:
    """Token i is character i of a table; 99 then 98 is "é" (a character over two byte tokens)."""

    def __init__(self, table: str):
        self.table = table

    def decode(self, ids) -> str:
        text, i = "", 0
        while i < len(ids):
            if ids[i] == 99:  # the first half of "é": complete only with the next token 98
                text += "é" if i + 1 < len(ids) and ids[i + 1] == 98 else "\ufffd"
                i += 2 if i + 1 < len(ids) and ids[i + 1] == 98 else 1
            else:
                text += self.table[ids[i]]
                i += 1
        return text


def stream(ids, stop=()) -> tuple[list[str], TextStream]:
    ts = TextStream(CharTokenizer("abc STOPxyz"), stop)
    pieces = [ts.add(i) for i in ids]
    pieces.append(ts.finish())
    return pieces, ts


def test_text_stream_holds_back_stop_prefixes_and_half_characters():
    ids = [0, 1, 99, 98, 3, 4, 5, 6, 7, 2]  # "abé STOPc"
    pieces, ts = stream(ids)
    assert "".join(pieces) == "abé STOPc" and "\ufffd" not in "".join(pieces) and not ts.stopped
    pieces, ts = stream(ids, stop=["STOP"])
    assert "".join(pieces) == "abé " and ts.stopped
    assert "S" not in "".join(pieces[:8])  # "S", "ST", "STO" were held back until they became the stop
    pieces, ts = stream([4, 5, 0], stop=["STOP"])  # a held-back "ST" that was not a stop after all
    assert "".join(pieces) == "STa" and not ts.stopped


@pytest.mark.parametrize("path, name", [("/w/run7/checkpoints/1500", "run7-1500"), ("gs://b/run7/checkpoints", "run7"),
                                        ("/w/llama65b/", "llama65b")])
def test_model_names(path, name):
    assert model_name_from_path(path) == name


def test_decoder_refuses_what_the_cache_cannot_hold():
    from lima_jax.sampling.decode import Decoder, Request

    decoder = Decoder.__new__(Decoder)  # check() needs only the cache length
    decoder.length = 8
    with pytest.raises(ValueError, match="1 to 7"):
        decoder.check(Request(tuple(range(8)), 1))
    with pytest.raises(ValueError, match="max_tokens=5: 1 to 4"):
        decoder.check(Request(tuple(range(4)), 5))
    decoder.check(Request(tuple(range(4)), 4))
    decoder.check(Request((1,), 7))
