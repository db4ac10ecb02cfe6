"""Tokenizers: one interface, a SentencePiece and a Hugging Face `tokenizer.json` implementation.

- `SentencePieceTokenizer`: LLaMA-1/2's and Mistral's `tokenizer.model`. These have no
  end-of-turn token, so LIMA adds one: EOT's id is the piece count (32000 for LLaMA's 32,000
  pieces) and the model's vocabulary is pieces + 1; EOT never collides with BOS/EOS.
- `HFTokenizer`: a `tokenizer.json` through the `tokenizers` library (Llama 3, Qwen), with the
  bos/eos tokens of the `tokenizer_config.json` beside it. Its end-of-turn token is an existing
  special token (`<|eot_id|>`, `<|im_end|>`); only a vocabulary without one gets LIMA's added row.

Both give `encode` (no specials added), `decode` (skips special tokens and ids past the
vocabulary: padding rows), `bos_id` (None where the model has none: Qwen), `eos_id`, `eot_id`,
`vocab_size` (the rows a model needs at least; Qwen pads its embedding beyond), `eot_added`,
`token_id`, `token_text` and `to_record` (JSON-able, bytes as base64: what checkpoints store).
Files are read through `lima_jax.storage`, so any path may be `gs://`.
"""

import base64
import json
import zlib

import numpy as np
import sentencepiece as spm

from lima_jax.errors import ConfigError

EOT_TOKEN = "<|eot|>"  # LIMA's added end-of-turn token, as the HF export names it
EXISTING_EOT = ("<|eot_id|>", "<|im_end|>", EOT_TOKEN)  # Llama 3, ChatML (Qwen), an exported added EOT
HF_FILE, HF_CONFIG = "tokenizer.json", "tokenizer_config.json"
_GUESS_BOS = ("<|begin_of_text|>", "<s>", "<bos>")  # without tokenizer_config.json
_GUESS_EOS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")


class Tokenizer:
    """The interface every caller uses; `eot_added`: EOT is LIMA's extra row (id = vocab_size - 1),
    which a base model converted without `--add_eot` lacks."""

    kind: str
    bos_id: int | None
    eos_id: int | None
    eot_id: int
    vocab_size: int
    eot_added: bool

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_id(self, text: str) -> int | None:
        """The id of a token written as `text` (a special token such as `<|eot_id|>`), else None."""
        raise NotImplementedError

    def token_text(self, token: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token for logprobs; special tokens by name, without bytes."""
        raise NotImplementedError

    def to_record(self) -> dict:
        raise NotImplementedError

    def fits_vocab(self, model_vocab: int) -> bool:
        """A model with `model_vocab` rows can be trained with this tokenizer: exactly pieces + EOT
        for an added EOT row; at least the tokenizer's ids otherwise (Qwen pads its embedding)."""
        return model_vocab == self.vocab_size if self.eot_added else model_vocab >= self.vocab_size

    def same_as(self, other: "Tokenizer") -> bool:
        return self.to_record() == other.to_record()


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    eot_added = True

    def __init__(self, proto: bytes):
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.num_pieces = self.sp.get_piece_size()
        self.eot_id = self.num_pieces
        self.vocab_size = self.num_pieces + 1
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([i for i in _ints(ids) if 0 <= i < self.num_pieces])

    def token_id(self, text: str) -> int | None:
        if text == EOT_TOKEN:
            return self.eot_id
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() and text != self.sp.id_to_piece(i) else i

    def token_text(self, token: int) -> tuple[str, list[int]]:
        if token >= self.num_pieces:
            return (EOT_TOKEN if token == self.eot_id else f"<|{token}|>"), []
        if self.sp.is_byte(token):
            value = int(self.sp.id_to_piece(token)[3:5], 16)  # "<0x0A>"
            return bytes([value]).decode("utf-8", errors="replace"), [value]
        text = self.sp.id_to_piece(token).replace("\u2581", " ")
        return text, list(text.encode("utf-8"))

    def to_record(self) -> dict:
        return {"kind": self.kind, "model": base64.b64encode(self.proto).decode("ascii")}


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, tokenizer_json: bytes, tokenizer_config: bytes | None = None):
        import tokenizers

        self.tokenizer_json, self.tokenizer_config = tokenizer_json, tokenizer_config
        self.tok = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.num_ids = max(vocab.values()) + 1
        self.specials = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        config = json.loads(tokenizer_config) if tokenizer_config else {}
        self.bos_id = self._special(config, "bos_token", _GUESS_BOS)
        self.eos_id = self._special(config, "eos_token", _GUESS_EOS)
        existing = next((vocab[t] for t in EXISTING_EOT if t in vocab), None)
        self.eot_added = existing is None
        self.eot_id = self.num_ids if self.eot_added else existing
        self.vocab_size = self.num_ids + self.eot_added

    def _special(self, config: dict, key: str, guesses: tuple[str, ...]) -> int | None:
        if key in config:  # present, perhaps null (Qwen has no BOS)
            value = config[key]
            value = value.get("content") if isinstance(value, dict) else value
            return None if value is None else self.tok.token_to_id(value)
        return next((self.tok.token_to_id(t) for t in guesses if self.tok.token_to_id(t) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([i for i in _ints(ids) if 0 <= i < self.num_ids], skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.eot_id if self.eot_added and text == EOT_TOKEN else self.tok.token_to_id(text)

    def token_text(self, token: int) -> tuple[str, list[int]]:
        piece = self.tok.id_to_token(token) if 0 <= token < self.num_ids else None
        if piece is None or piece in self.specials:
            return piece or (EOT_TOKEN if token == self.eot_id else f"<|{token}|>"), []
        if piece.startswith("<0x") and len(piece) == 6:  # byte fallback (Metaspace tokenizers)
            value = int(piece[3:5], 16)
            return bytes([value]).decode("utf-8", errors="replace"), [value]
        if all(c in _BYTE_DECODER for c in piece):  # byte-level BPE (Llama 3, Qwen): one char per byte
            raw = bytes(_BYTE_DECODER[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = piece.replace("\u2581", " ")
        return text, list(text.encode("utf-8"))

    def to_record(self) -> dict:
        config = None if self.tokenizer_config is None else base64.b64encode(self.tokenizer_config).decode("ascii")
        return {"kind": self.kind, "tokenizer_config": config,  # tokenizer.json compressed: megabytes -> a quarter
                "tokenizer_json_zlib": base64.b64encode(zlib.compress(self.tokenizer_json)).decode("ascii")}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable char standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


def _ints(ids) -> list[int]:
    return [int(i) for i in np.asarray(ids).reshape(-1)]


def tokenizer_from_record(record) -> Tokenizer:
    """A tokenizer from `to_record()`'s dict, or from the raw SentencePiece proto older
    checkpoints store in `meta.tokenizer`."""
    if isinstance(record, bytes):
        return SentencePieceTokenizer(record)
    kind = record.get("kind")
    if kind == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer(base64.b64decode(record["model"]))
    if kind == HFTokenizer.kind:
        config = record.get("tokenizer_config")
        return HFTokenizer(zlib.decompress(base64.b64decode(record["tokenizer_json_zlib"])),
                           None if config is None else base64.b64decode(config))
    raise ConfigError(f"a stored tokenizer of kind {kind!r}; known: sentencepiece, hf")


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at a local or gs:// `path`: "" = the demo tokenizer (built once, cached); a
    `tokenizer.json` file, or a folder holding one, = HF (with its `tokenizer_config.json`);
    anything else (`tokenizer.model`, or a folder holding only that) = SentencePiece."""
    from lima_jax import storage

    if not path:
        from lima_jax.data import demo
        path = demo.build_demo_tokenizer()
    p = storage.path(path)
    if p.is_dir():
        p = p / HF_FILE if (p / HF_FILE).is_file() else p / "tokenizer.model"
    if not p.is_file():
        raise ConfigError(f"tokenizer {path}: no such file (a tokenizer.model, a tokenizer.json or a folder holding one)")
    data = p.read_bytes()
    if p.name.endswith(".json"):
        config = p.parent / HF_CONFIG
        return HFTokenizer(data, config.read_bytes() if config.is_file() else None)
    if _is_tiktoken(data):
        raise ConfigError(f"{p} is a tiktoken file (Meta's Llama 3 `original/` folder), which lima_jax does not read: "
                          "use the Hugging Face folder's tokenizer.json")
    try:
        return SentencePieceTokenizer(data)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"{p} is not a SentencePiece model ({e})") from None


def _is_tiktoken(data: bytes) -> bool:
    """Meta's Llama 3 tokenizer.model: text lines of `base64-token rank`."""
    first = data[:200].split(b"\n", 1)[0].split(b" ")
    return len(first) == 2 and first[1].isdigit()
