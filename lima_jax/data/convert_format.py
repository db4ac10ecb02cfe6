"""Rewrite any supported input as LIMA jsonl, to see what will train:

    python -m lima_jax.data.convert_format IN OUT [--format auto|lima|openai|sharegpt|alpaca] [--overwrite]

IN is anything `config.data.train_path` takes (a jsonl or Parquet file, a folder of shards, a
`datasets.save_to_disk` folder, hf://NAME[:split]; local or gs://). OUT gets one line per record:
`conversations` (user, assistant, ... turns), `source`, and `system` where the record has one.
Records are checked as training checks them (a bad one stops the conversion, naming its line);
nothing is dropped, so an unanswered final turn stays as it is (training drops and counts it).
"""

import argparse
import json
import sys

from lima_jax import storage
from lima_jax.data import readers


def convert(in_path: str, out_path: str, fmt: str = "auto", overwrite: bool = False) -> tuple[int, str]:
    """Write `in_path`'s records to `out_path` as LIMA jsonl; returns (records, format read)."""
    out = storage.path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists: pass --overwrite to replace it, or choose another OUT")
    conversations, found = readers.read(in_path, fmt)
    lines = []
    for conv in conversations:
        record = dict(conversations=list(conv.turns), source=conv.source)
        if conv.system is not None:
            record["system"] = conv.system
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    out.write_text("".join(lines), encoding="utf-8")
    return len(lines), found


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lima_jax.data.convert_format", description=__doc__.splitlines()[0])
    parser.add_argument("input", metavar="IN")
    parser.add_argument("output", metavar="OUT")
    parser.add_argument("--format", default="auto", choices=("auto", *readers.FORMATS))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    count, found = convert(args.input, args.output, args.format, args.overwrite)
    print(f"{args.output}: {count} records read as {found}")


if __name__ == "__main__":
    from lima_jax import cli

    cli.guarded(main, sys.argv[1:])
