"""The tokenizer that travels with the weights: found at conversion, written at export.

Conversion stores the tokenizer (`Tokenizer.to_record()`: a SentencePiece `tokenizer.model`, or
an HF `tokenizer.json` with its `tokenizer_config.json`) in the checkpoint's
`CheckpointMeta.tokenizer`, after checking that it fits the model's vocabulary: a SentencePiece
model's piece count is exactly the vocabulary; an HF tokenizer's ids are at most the vocabulary
(Qwen pads its embedding).

Export writes what `transformers.AutoTokenizer` loads as a chat model, with the chat template
of the checkpoint's chat format (`lima_jax.data.chat_format.hf_chat_template`):
- SentencePiece: `tokenizer.model` (the proto, unchanged) and `tokenizer_config.json` naming
  LlamaTokenizer with `legacy: true`: SentencePiece's dummy prefix ("▁") then starts every text
  segment, also the one after a special token, which is how LIMA's format encodes each turn on
  its own; LIMA's end-of-turn token as an added special token `EOT_TOKEN` ("<|eot|>") at id =
  piece count (32000 for LLaMA), so `decode(skip_special_tokens=True)` drops it.
- HF: `tokenizer.json` as stored (plus `EOT_TOKEN` as an added special token where LIMA added
  the row) and its `tokenizer_config.json` with the chat template.
The `lima` template: BOS, then each message's content followed by EOT. Roles must alternate
user, assistant, user, ...: LIMA has no system role, so a system message is refused
(raise_exception), never silently merged. The assistant turn has no header, so
`add_generation_prompt` adds nothing: the model answers after the last user turn's EOT.

Known difference (documented, not hidden): transformers' Metaspace does not add the dummy
prefix to a segment that already starts with a space, SentencePiece does; so a turn that starts
with whitespace gets one "▁" fewer. transformers also skips the proto's normalizer, so a
tokenizer that normalizes (the demo's nmt_nfkc, collapsed spaces) can differ on such text; a
warning says so (LLaMA's tokenizer does not normalize).
"""

import json
import logging
import pathlib

from lima_jax.convert.errors import ConversionError
from lima_jax.data import chat_format
from lima_jax.data.tokenizer import (
    EOT_TOKEN,
    HF_CONFIG,
    HF_FILE,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from lima_jax.errors import LimaError

log = logging.getLogger(__name__)

TOKENIZER_MODEL = "tokenizer.model"


def read_tokenizer(path, *, vocab_size: int, where_vocab: str) -> Tokenizer:
    """The tokenizer at `path` (a file or folder, local or gs://), checked to fit the source
    model's `vocab_size` rows (an EOT row, if LIMA adds one, is counted after)."""
    try:
        tok = load_tokenizer(str(path))
    except LimaError as e:
        raise ConversionError(str(e)) from None
    ids = tok.vocab_size - tok.eot_added  # the rows the source model must already have
    if ids != vocab_size if tok.eot_added else ids > vocab_size:
        what = f"{ids} pieces" if tok.kind == SentencePieceTokenizer.kind else f"{ids} ids"
        raise ConversionError(f"{path} has {what} but {where_vocab} has vocab_size={vocab_size}: "
                              "not this model's tokenizer; pass the right one with --tokenizer")
    return tok


def normalizes(proto: bytes) -> str | None:
    """What SentencePiece normalization the proto applies, if any (transformers skips it)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    spec = model.normalizer_spec
    changes = ([f"normalizer {spec.name}"] if spec.name not in ("identity", "") else []) + \
        (["remove_extra_whitespaces"] if spec.remove_extra_whitespaces else [])
    return ", ".join(changes) or None


def hf_tokenizer_files(tok: Tokenizer, eot_id: int | None, vocab_size: int, max_len: int,
                       fmt: str | None = None) -> dict[str, bytes]:
    """{file name: contents} for an export. With `eot_id` (a model with an end-of-turn row): the
    chat template of `fmt` (None: `lima` for SentencePiece; an HF tokenizer's own template);
    without (a base model): the plain tokenizer."""
    if isinstance(tok, bytes):  # a SentencePiece proto, as older checkpoints store it
        tok = SentencePieceTokenizer(tok)
    if eot_id is not None and eot_id != tok.eot_id:
        raise ConversionError(f"the checkpoint's EOT id is {eot_id} but its tokenizer has {tok.vocab_size - 1} pieces "
                              "(EOT must be the id after the last piece): not this checkpoint's tokenizer"
                              if tok.eot_added else f"the checkpoint's EOT id is {eot_id} but its tokenizer's "
                              f"end-of-turn token is {tok.eot_id}: not this checkpoint's tokenizer")
    if eot_id is None and tok.eot_added and tok.vocab_size - 1 != vocab_size:
        raise ConversionError(f"the checkpoint is a {vocab_size}-token base model but its tokenizer has "
                              f"{tok.vocab_size - 1} pieces: not this checkpoint's tokenizer")
    if fmt is not None:
        chat_format.check(tok, fmt, key="the checkpoint's chat_format")
    if tok.kind == SentencePieceTokenizer.kind:
        return _sentencepiece_files(tok, eot_id, max_len, fmt or "lima")
    return _hf_files(tok, eot_id, max_len, fmt)


def _sentencepiece_files(tok: SentencePieceTokenizer, eot_id: int | None, max_len: int, fmt: str) -> dict[str, bytes]:
    sp = tok.sp
    if sp.piece_to_id(EOT_TOKEN) != sp.unk_id():
        raise ConversionError(f"the tokenizer already has a piece {EOT_TOKEN!r}; it cannot name LIMA's EOT")
    issue = normalizes(tok.proto)
    if issue:
        log.warning("the tokenizer applies SentencePiece normalization (%s) that transformers' LlamaTokenizer "
                    "does not: texts it would change (e.g. runs of spaces) may tokenize differently there", issue)
    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()), "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    if eot_id is not None:
        config["added_tokens_decoder"] = {str(eot_id): {
            "content": EOT_TOKEN, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False}}
        config["additional_special_tokens"] = [EOT_TOKEN]
        config["chat_template"] = chat_format.hf_chat_template(fmt)
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token")}
    if eot_id is not None:
        specials["additional_special_tokens"] = [EOT_TOKEN]
    return {TOKENIZER_MODEL: tok.proto, HF_CONFIG: _json(config), "special_tokens_map.json": _json(specials)}


def _hf_files(tok: HFTokenizer, eot_id: int | None, max_len: int, fmt: str | None) -> dict[str, bytes]:
    """tokenizer.json (LIMA's added EOT, if any, as a special token at its id) and its config."""
    import tokenizers

    tokenizer_json = tok.tokenizer_json
    if eot_id is not None and tok.eot_added:
        hf = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        hf.add_special_tokens([tokenizers.AddedToken(EOT_TOKEN, special=True, normalized=False)])
        if hf.token_to_id(EOT_TOKEN) != eot_id:
            raise ConversionError(f"{EOT_TOKEN} would get id {hf.token_to_id(EOT_TOKEN)}, not the checkpoint's {eot_id}")
        tokenizer_json = hf.to_str().encode("utf-8")
    config = json.loads(tok.tokenizer_config) if tok.tokenizer_config else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    name = lambda i: None if i is None else tok.tok.id_to_token(i)  # noqa: E731
    config.setdefault("bos_token", name(tok.bos_id))
    config.setdefault("eos_token", name(tok.eos_id))
    config["model_max_length"] = max_len
    config.pop("added_tokens_decoder", None)  # tokenizer.json holds them, LIMA's EOT included
    if eot_id is None:
        config.pop("chat_template", None)
    elif fmt is not None or tok.eot_added:
        eot_text = EOT_TOKEN if tok.eot_added else tok.tok.id_to_token(tok.eot_id)
        config["chat_template"] = chat_format.hf_chat_template(fmt or "lima", eot_text)
    return {HF_FILE: tokenizer_json, HF_CONFIG: _json(config)}


def _json(record: dict) -> bytes:
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode()


def find_source_tokenizer(found: pathlib.Path | None, explicit, *, vocab_size: int, where_vocab: str
                          ) -> Tokenizer | None:
    """The tokenizer to store with converted weights: `explicit` (--tokenizer) wins, else the one
    found beside the weights; None (with a warning) when there is neither."""
    path = explicit if explicit is not None else found
    if path is None:
        log.warning("no tokenizer.model beside the weights and no --tokenizer (nor a tokenizer.json): the "
                    "checkpoint stores no tokenizer, so sampling and export will need --tokenizer")
        return None
    return read_tokenizer(path, vocab_size=vocab_size, where_vocab=where_vocab)
