"""The same conversations written in every input format the readers take, each writer written
from the format's public description (not from lima_jax's readers). Not a test module.

A conversation here is a dict: `turns` (user, assistant, ...), `source`, optional `system`."""

import json

from lima_jax.data import demo


def demo_conversations() -> list[dict]:
    """The demo dataset's 200 conversations (188 single-turn, 12 with two exchanges)."""
    rows = [json.loads(line) for line in open(demo.DEMO_TRAIN)]
    return [dict(turns=r["conversations"], source=r["source"]) for r in rows]


def lima_record(c: dict) -> dict:
    return dict(conversations=list(c["turns"]), source=c["source"], **({"system": c["system"]} if "system" in c else {}))


def openai_record(c: dict) -> dict:
    system = [{"role": "system", "content": c["system"]}] if "system" in c else []
    turns = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(c["turns"])]
    return dict(messages=system + turns, source=c["source"])


def sharegpt_record(c: dict) -> dict:
    system = [{"from": "system", "value": c["system"]}] if "system" in c else []
    turns = [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(c["turns"])]
    return dict(conversations=system + turns, source=c["source"])


def alpaca_record(c: dict) -> dict:
    """The last exchange as instruction/input/output (a user turn "instruction\\ninput" is split
    back into its two fields), earlier exchanges as `history` pairs."""
    turns = list(c["turns"])
    instruction, _, extra = turns[-2].partition("\n")
    history = {"history": [turns[i:i + 2] for i in range(0, len(turns) - 2, 2)]} if len(turns) > 2 else {}
    return dict(instruction=instruction, input=extra, output=turns[-1], source=c["source"], **history,
                **({"system": c["system"]} if "system" in c else {}))


RECORDS = {"lima": lima_record, "openai": openai_record, "sharegpt": sharegpt_record, "alpaca": alpaca_record}


def write_jsonl(path, records: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_parquet(path, records: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def write_saved_dataset(path, records: list[dict]) -> str:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return str(path)


def write_parquet_shards(folder, records: list[dict], shards: int = 3) -> str:
    """`shards` Parquet files whose name order is the records' order."""
    folder.mkdir()
    size = -(-len(records) // shards)
    for i in range(shards):
        write_parquet(folder / f"part-{i:05d}.parquet", records[i * size:(i + 1) * size])
    return str(folder)
