"""Download LIMA (GAIR/lima on the Hugging Face Hub) into train.jsonl / test.jsonl.

The dataset is gated: accept its terms on the Hub, then log in (`huggingface-cli login`) or
pass a token / set HF_TOKEN. Not used by tests. Usage:

    python -m lima_jax.data.download --out data/lima [--token hf_...]
"""

import argparse
import json
import pathlib

REPO_ID = "GAIR/lima"
FILES = ("train.jsonl", "test.jsonl")


def download_lima(out_dir: str, token: str | None = None, revision: str | None = None) -> list[str]:
    """Fetch the jsonl files into `out_dir`, check each line parses, and return their paths."""
    import huggingface_hub  # lazy: only this helper needs it

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in FILES:
        cached = huggingface_hub.hf_hub_download(REPO_ID, name, repo_type="dataset", token=token, revision=revision)
        text = pathlib.Path(cached).read_text()
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip() and "conversations" not in json.loads(line):
                raise ValueError(f"{REPO_ID}/{name}:{line_no}: no 'conversations' field")
        (out / name).write_text(text)
        paths.append(str(out / name))
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args()
    for path in download_lima(args.out, args.token, args.revision):
        print(path)


if __name__ == "__main__":
    main()
