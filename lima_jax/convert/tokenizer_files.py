"""The tokenizer that travels with the weights: found at conversion, written at export.

Conversion stores the SentencePiece model proto (`tokenizer.model`) in the checkpoint's
`model_store.CheckpointMeta.tokenizer`, after checking that its piece count is the model's vocabulary.

Export writes what `transformers.AutoTokenizer` loads as a chat model:
- `tokenizer.model` (the proto, unchanged) and `tokenizer_config.json` naming LlamaTokenizer
  with `legacy: true`: SentencePiece's dummy prefix ("▁") then starts every text segment, also
  the one after a special token, which is how LIMA's format encodes each turn on its own;
- LIMA's end-of-turn token as an added special token `EOT_TOKEN` ("<|eot|>") at id = piece
  count (32000 for LLaMA), so `decode(skip_special_tokens=True)` drops it;
- `chat_template`: BOS, then each message's content followed by EOT, exactly
  `data.format.encode_conversation`. Roles must alternate user, assistant, user, ...: LIMA
  has no system role, so a system message is refused (raise_exception), never silently
  merged. The assistant turn has no header, so `add_generation_prompt` adds nothing: the model
  answers after the last user turn's EOT and ends its answer with EOT.

Known difference (documented, not hidden): transformers' Metaspace does not add the dummy
prefix to a segment that already starts with a space, SentencePiece does; so a turn that starts
with whitespace gets one "▁" fewer. transformers also skips the proto's normalizer, so a
tokenizer that normalizes (the demo's nmt_nfkc, collapsed spaces) can differ on such text; a
warning says so (LLaMA's tokenizer does not normalize).
"""

import json
import logging
import pathlib

import sentencepiece as spm

from lima_jax.convert.errors import ConversionError

log = logging.getLogger(__name__)

TOKENIZER_MODEL = "tokenizer.model"
EOT_TOKEN = "<|eot|>"
SYSTEM_REFUSED = "LIMA's format has no system role: put the instructions in the first user message"
ALTERNATE = "roles must alternate user, assistant, user, ... starting with user"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception(\"" + SYSTEM_REFUSED + "\") }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception(\"" + ALTERNATE + "\") }}"
    "{% endif %}"
    "{{ message['content'] }}" + EOT_TOKEN +
    "{% endfor %}"
)


def processor(proto: bytes, where: str) -> spm.SentencePieceProcessor:
    """Parse a SentencePiece model proto; `where` names its origin in the error."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
        raise ConversionError(f"{where} is not a SentencePiece model ({e})") from None
    return sp


def read_tokenizer(path, *, vocab_size: int, where_vocab: str) -> bytes:
    """The proto at `path` (local or gs://), checked to have exactly `vocab_size` pieces: the
    rows of the source model the tokenizer must index (an EOT row, if added, is counted after)."""
    from lima_jax import storage

    path = storage.path(path)
    if not path.is_file():
        raise ConversionError(f"--tokenizer={path}: no such file")
    proto = path.read_bytes()
    pieces = processor(proto, str(path)).get_piece_size()
    if pieces != vocab_size:
        raise ConversionError(f"{path} has {pieces} pieces but {where_vocab} has vocab_size={vocab_size}: "
                              "not this model's tokenizer; pass the right one with --tokenizer")
    return proto


def normalizes(proto: bytes) -> str | None:
    """What SentencePiece normalization the proto applies, if any (transformers skips it)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    spec = model.normalizer_spec
    changes = ([f"normalizer {spec.name}"] if spec.name not in ("identity", "") else []) + \
        (["remove_extra_whitespaces"] if spec.remove_extra_whitespaces else [])
    return ", ".join(changes) or None


def hf_tokenizer_files(proto: bytes, eot_id: int | None, vocab_size: int, max_len: int) -> dict[str, bytes]:
    """{file name: contents} for an export. With `eot_id` (a LIMA model): EOT as special token
    and the chat template; without (a base model): the plain LLaMA tokenizer."""
    sp = processor(proto, "the checkpoint's tokenizer")
    pieces = sp.get_piece_size()
    if eot_id is not None and eot_id != pieces:
        raise ConversionError(f"the checkpoint's EOT id is {eot_id} but its tokenizer has {pieces} pieces (EOT must "
                              "be the id after the last piece): not this checkpoint's tokenizer")
    if eot_id is None and pieces != vocab_size:
        raise ConversionError(f"the checkpoint is a {vocab_size}-token base model but its tokenizer has {pieces} "
                              "pieces: not this checkpoint's tokenizer")
    if sp.piece_to_id(EOT_TOKEN) != sp.unk_id():
        raise ConversionError(f"the tokenizer already has a piece {EOT_TOKEN!r}; it cannot name LIMA's EOT")
    issue = normalizes(proto)
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
        config["chat_template"] = CHAT_TEMPLATE
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token")}
    if eot_id is not None:
        specials["additional_special_tokens"] = [EOT_TOKEN]
    return {TOKENIZER_MODEL: proto, "tokenizer_config.json": _json(config),
            "special_tokens_map.json": _json(specials)}


def _json(record: dict) -> bytes:
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode()


def find_source_tokenizer(found: pathlib.Path | None, explicit, *, vocab_size: int, where_vocab: str) -> bytes | None:
    """The proto to store with converted weights: `explicit` (--tokenizer) wins, else the one
    found beside the weights; None (with a warning) when there is neither."""
    path = explicit if explicit is not None else found
    if path is None:
        log.warning("no tokenizer.model beside the weights and no --tokenizer: the checkpoint stores no tokenizer, "
                    "so sampling and export will need --tokenizer")
        return None
    return read_tokenizer(path, vocab_size=vocab_size, where_vocab=where_vocab)
