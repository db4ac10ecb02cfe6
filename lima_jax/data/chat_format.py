"""Chat formats: a conversation -> token ids + loss weights, a prompt, stop ids, an HF chat template.

- `lima` (the paper's, the default for LLaMA-1/2): BOS, then every turn followed by the
  end-of-turn token. No system role: a system message is refused, naming its record.
- `llama3` (Llama-3-Instruct's template, as in its tokenizer_config.json): `<|begin_of_text|>`,
  then per message `<|start_header_id|>ROLE<|end_header_id|>\n\n` + content (stripped: the
  template's `| trim`) + `<|eot_id|>`; an optional system message first. No date lines.
- `chatml` (Qwen): per message `<|im_start|>ROLE\n` + content + `<|im_end|>\n`, an optional
  system message first. No BOS. Unlike Qwen2.5-Instruct's template, no default system message
  ("You are Qwen, ...") is inserted when none is given: lima_jax fine-tunes on the data's own
  turns, and the template it exports (`hf_chat_template`) does the same, so they agree.

The loss covers each assistant turn's content and its end-of-turn token, nothing of the headers
(`train_on="last"`: the final assistant turn only). Text between two special tokens is encoded
in one piece, as transformers' `apply_chat_template` does; a token that straddles a header's
end and the content's start (ChatML's "\n" + a content starting with "\n") counts as content.
"""

import numpy as np

from lima_jax.data.conversation import Conversation
from lima_jax.data.tokenizer import EOT_TOKEN, Tokenizer
from lima_jax.errors import ConfigError, DataError

FORMATS = ("lima", "llama3", "chatml")
TRAIN_ON = ("all", "last")
HAS_SYSTEM = {"lima": False, "llama3": True, "chatml": True}
# The special tokens each format writes, besides the tokenizer's BOS / end-of-turn.
SPECIALS = {"lima": (), "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "chatml": ("<|im_start|>", "<|im_end|>")}
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}  # lima: the tokenizer's eot_id

SYSTEM_REFUSED = "LIMA's format has no system role: put the instructions in the first user message"
ALTERNATE = "roles must alternate user, assistant, user, ... starting with user"
_LIMA_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception(\"" + SYSTEM_REFUSED + "\") }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception(\"" + ALTERNATE + "\") }}"
    "{% endif %}"
    "{{ message['content'] }}{{ eot }}"
    "{% endfor %}"
)
_TEMPLATES = {
    # Llama-3-Instruct's own template, unchanged (../shared/llama3/tokenizer_config.json).
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
}


def check(tokenizer: Tokenizer, fmt: str, key: str = "config.data.chat_format") -> None:
    """`fmt` is a format this tokenizer can write (its special tokens exist), else ConfigError."""
    if fmt not in FORMATS:
        raise ConfigError(f"{key}={fmt!r}: choose one of {', '.join(FORMATS)}")
    missing = [t for t in SPECIALS[fmt] if tokenizer.token_id(t) is None]
    if missing:
        raise ConfigError(f"{key}={fmt!r} needs the special tokens {missing}, which this tokenizer lacks: "
                          f"use the format of the model's tokenizer ({', '.join(FORMATS)})")


def encode(conversation: Conversation, tokenizer: Tokenizer, fmt: str = "lima", train_on: str = "all"
           ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, loss weights float32) of a conversation (turns user, assistant, ...)."""
    if train_on not in TRAIN_ON:
        raise ConfigError(f"config.data.train_on={train_on!r}: choose one of {', '.join(TRAIN_ON)}")
    if conversation.system is not None and not HAS_SYSTEM[fmt]:
        raise DataError(f"{conversation.where}: a system message, but the {fmt!r} chat format has no system role: "
                        "drop it, or train with config.data.chat_format='llama3' or 'chatml'")
    turns = conversation.turns
    last = max((i for i in range(len(turns)) if i % 2), default=-1)
    weights = [float(i % 2 == 1 and (train_on == "all" or i == last)) for i in range(len(turns))]
    return _assemble(_parts(fmt, tokenizer, turns, weights, conversation.system), tokenizer)


def prompt_ids(turns, tokenizer: Tokenizer, fmt: str = "lima", system: str | None = None) -> list[int]:
    """Ids for sampling: the conversation so far (ending with a user turn), then what starts the
    assistant's turn (its header), so the model answers and ends with the end-of-turn token."""
    turns = [turns] if isinstance(turns, str) else list(turns)
    if len(turns) % 2 != 1:
        raise ValueError("a prompt must end with a user turn (an odd number of turns)")
    if system is not None and not HAS_SYSTEM[fmt]:
        raise ValueError(f"the {fmt!r} chat format has no system role: {SYSTEM_REFUSED}")
    parts = _parts(fmt, tokenizer, turns, [0.0] * len(turns), system) + _header(fmt, tokenizer, "assistant")
    return _assemble(parts, tokenizer)[0].tolist()


def end_of_turn_id(tokenizer: Tokenizer, fmt: str) -> int:
    return tokenizer.eot_id if fmt == "lima" else tokenizer.token_id(END_OF_TURN[fmt])


def stop_ids(tokenizer: Tokenizer, fmt: str) -> list[int]:
    """The ids that end an answer in this format: its end-of-turn token, and EOS if there is one."""
    ids = [end_of_turn_id(tokenizer, fmt)] + ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
    return sorted(set(ids))


def hf_chat_template(fmt: str, eot_token: str = EOT_TOKEN) -> str:
    """The Jinja chat template for an HF export: `apply_chat_template` on the same messages gives
    `encode`'s ids (and with `add_generation_prompt`, `prompt_ids`'). `eot_token`: the text of
    the end-of-turn token in `lima` (LIMA's added `<|eot|>`, or the tokenizer's own)."""
    if fmt == "lima":
        return _LIMA_TEMPLATE.replace("{{ eot }}", eot_token)
    return _TEMPLATES[fmt]


def _parts(fmt: str, tokenizer: Tokenizer, turns, weights: list[float], system: str | None) -> list[tuple]:
    """The conversation as (special id or text, weight) pieces, in order."""
    tid = tokenizer.token_id
    roles = [("system", system, 0.0)] if system is not None else []
    roles += [("user" if i % 2 == 0 else "assistant", t, w) for i, (t, w) in enumerate(zip(turns, weights))]
    if fmt == "lima":
        start = [] if tokenizer.bos_id is None else [(tokenizer.bos_id, 0.0)]
        return start + [p for _, text, w in roles for p in ((text, w), (tokenizer.eot_id, w))]
    if fmt == "llama3":
        out = [(tid("<|begin_of_text|>"), 0.0)]
        for role, text, w in roles:
            out += _header(fmt, tokenizer, role) + [(text.strip(), w), (tid("<|eot_id|>"), w)]
        return out
    if fmt == "chatml":
        out = []
        for role, text, w in roles:
            out += _header(fmt, tokenizer, role) + [(text, w), (tid("<|im_end|>"), w), ("\n", 0.0)]
        return out
    raise ValueError(f"chat format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _header(fmt: str, tokenizer: Tokenizer, role: str) -> list[tuple]:
    tid = tokenizer.token_id
    if fmt == "llama3":
        return [(tid("<|start_header_id|>"), 0.0), (role, 0.0), (tid("<|end_header_id|>"), 0.0), ("\n\n", 0.0)]
    if fmt == "chatml":
        return [(tid("<|im_start|>"), 0.0), (role + "\n", 0.0)]
    return []


def _assemble(parts: list[tuple], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Ids and weights of the pieces: special ids as they are, each run of texts between them
    encoded in one piece."""
    ids: list[int] = []
    weights: list[float] = []
    run: list[tuple[str, float]] = []
    for piece, w in parts + [(None, 0.0)]:
        if isinstance(piece, str):
            if piece:
                run.append((piece, w))
            continue
        if run:
            run_ids, run_w = _encode_run(run, tokenizer)
            ids += run_ids
            weights += run_w
            run = []
        if piece is not None:
            ids.append(piece)
            weights.append(w)
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def _encode_run(run: list[tuple[str, float]], tokenizer: Tokenizer) -> tuple[list[int], list[float]]:
    """One text encoded whole; where the weight changes between its pieces, the tokens after the
    encoding of the text before that point take the new weight (a straddling token: the later)."""
    ids = tokenizer.encode("".join(text for text, _ in run))
    weights = [run[0][1]] * len(ids)
    for k in range(1, len(run)):
        if run[k][1] != run[k - 1][1]:
            before = tokenizer.encode("".join(text for text, _ in run[:k]))
            n = next((i for i, (a, b) in enumerate(zip(before, ids)) if a != b), min(len(before), len(ids)))
            weights[n:] = [run[k][1]] * (len(ids) - n)
    return ids, weights
