"""The judge prompts: plain text files with named placeholders, shipped in prompts/ and
replaceable with `--prompt_file`. A placeholder is `{name}`; nothing else in the file is special
(answers and the file itself may contain braces), and every placeholder a job fills must be there.
"""

import pathlib
import re
from collections.abc import Sequence

from lima_jax import storage

PROMPTS_DIR = pathlib.Path(__file__).resolve().parent / "prompts"
PLACEHOLDERS = {"pairwise": ("question", "answer_1", "answer_2"), "likert": ("question", "answer")}


def load_template(kind: str, prompt_file: str | None = None) -> tuple[str, str]:
    """(template text, where it came from) for `kind` ('pairwise' or 'likert'); a file missing
    one of the kind's placeholders is refused, naming it."""
    source = prompt_file or str(PROMPTS_DIR / f"{kind}.txt")
    text = storage.path(source).read_text()
    missing = [name for name in PLACEHOLDERS[kind] if "{" + name + "}" not in text]
    if missing:
        raise ValueError(f"{source}: the {kind} judge prompt lacks the placeholder(s) "
                         + ", ".join("{" + m + "}" for m in missing))
    return text, source


def render(template: str, **fields: str) -> str:
    """The template with each `{name}` replaced in one pass, so a value is inserted verbatim and
    never re-read (an answer that itself contains `{answer_2}` stays as it is)."""
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in fields))
    return pattern.sub(lambda m: fields[m.group(0)[1:-1]], template)


def conversation_text(turns: Sequence[str]) -> str:
    """The request as the judge reads it: the last user message, preceded by the earlier turns of
    a multi-turn conversation labelled User/Assistant."""
    if len(turns) == 1:
        return turns[0]
    roles = ["User", "Assistant"]
    return "\n\n".join(f"{roles[i % 2]}: {turn}" for i, turn in enumerate(turns))
