"""SentencePiece tokenizer plus LIMA's end-of-turn token.

LIMA adds one new token, EOT, after every utterance. It is not a SentencePiece piece: its id is
the piece count (32000 for LLaMA's 32,000 pieces), so the model's vocabulary is pieces + 1 and
EOT never collides with BOS/EOS. Files are read as bytes through `etils.epath`, which handles
local paths and `gs://` without TensorFlow (given gcsfs), so a run can point at a bucket.
"""

import dataclasses

import numpy as np
import sentencepiece as spm


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    sp: spm.SentencePieceProcessor

    @property
    def num_pieces(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eot_id(self) -> int:
        return self.num_pieces

    @property
    def vocab_size(self) -> int:
        """Pieces + EOT: the value `config.model.vocab_size` must have."""
        return self.num_pieces + 1

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Plain pieces: no BOS/EOS (the formatter adds BOS and EOT)."""
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Decode, dropping EOT and any id outside the SentencePiece vocabulary (padding)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.num_pieces]
        return self.sp.decode(ids)


def load_tokenizer(path: str) -> Tokenizer:
    """Load a SentencePiece model from a local or gs:// path.

    An empty path means the demo tokenizer, built (once, cached) from the demo dataset."""
    if not path:
        from lima_jax.data import demo
        path = demo.build_demo_tokenizer()
    from lima_jax import storage
    return tokenizer_from_proto(storage.path(path).read_bytes())


def tokenizer_from_proto(proto: bytes) -> Tokenizer:
    """A tokenizer from a serialized SentencePiece model (as checkpoints store it)."""
    return Tokenizer(spm.SentencePieceProcessor(model_proto=proto))
