"""Convert LLaMA weights: Meta / Hugging Face folder -> Orbax checkpoint, or Orbax -> Hugging Face.

    python launch/convert_checkpoint.py --source meta --input /llama/65B --output /ckpt/65b \
        --config configs/llama65b.py --add_eot
    python launch/convert_checkpoint.py --input Llama-3.1-8B/ --output /ckpt/llama3_8b   # --source told by its files
    python launch/convert_checkpoint.py --to hf --input WORKDIR_OR_CKPT --output /hf/lima-65b
    python launch/convert_checkpoint.py --to peft --input LORA_WORKDIR_OR_CKPT --output /hf/lima-65b-adapter

The tokenizer travels with the weights: conversion stores the folder's tokenizer.json or
tokenizer.model (for a Meta folder, also its parent's, where Meta ships it) in the checkpoint,
and the export writes it back as Hugging Face tokenizer files (the end-of-turn token as a
special token, the checkpoint's chat template); `--tokenizer` names one explicitly. An HF
folder's generation stop ids are kept too, so `sample.py --format raw --greedy` on the converted
checkpoint stops where transformers' `generate` does.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; never grab accelerators

from absl import flags
from ml_collections import config_flags

from lima_jax import cli

flags.DEFINE_enum("source", None, ["meta", "hf"], "Format of --input when converting to Orbax (default: told by "
                  "its files: config.json = hf, params.json = meta).")
flags.DEFINE_enum("to", "orbax", ["orbax", "hf", "peft"], "Output format: an Orbax checkpoint, a Hugging Face folder "
                  "(a LoRA checkpoint merged into its base), or a LoRA checkpoint's PEFT adapter folder.")
flags.DEFINE_string("input", None, "Source folder (Meta/HF) or, with --to hf, an Orbax checkpoint or work dir.")
flags.DEFINE_string("output", None, "Target folder (local or gs:// for Orbax).")
flags.DEFINE_bool("add_eot", False, "Grow the vocabulary by LIMA's end-of-turn token (new row = mean of rows).")
flags.DEFINE_integer("vocab_multiple", None, "Pad vocabulary rows to a multiple of this (default: config's, or 128).")
flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"], "Stored parameter dtype (default: config's or float32).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "With --to hf: tensor dtype (default: checkpoint's).")
flags.DEFINE_string("tokenizer", None, "tokenizer.model, tokenizer.json or a folder, to store with the converted weights, or with "
                    "--to hf to export (default: the one beside the weights / stored in the checkpoint).")
flags.DEFINE_bool("overwrite", False, "Replace an existing target.")
config_flags.DEFINE_config_file("config", None, "Model config (configs/*.py) to check the architecture against.")
flags.mark_flags_as_required(["input", "output"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from lima_jax.convert import convert_to_orbax, export_hf

    if FLAGS.to == "peft":
        from lima_jax.convert.lora_export import export_peft

        report = export_peft(FLAGS.input, FLAGS.output, overwrite=FLAGS.overwrite)
        print(f"wrote {report['output']}: {report['tensors']} adapter tensors, {report['bytes_written'] / 1e6:.1f} MB")
    elif FLAGS.to == "hf":
        report = export_hf(FLAGS.input, FLAGS.output, tokenizer=FLAGS.tokenizer, dtype=FLAGS.dtype,
                           overwrite=FLAGS.overwrite)
        print(f"wrote {report['output']}: {report['bytes_written'] / 1e6:.1f} MB in {report['files']} shard(s)"
              f"{'' if report['tokenizer'] else ', no tokenizer files'}")
    else:
        from lima_jax.config import model_config

        report = convert_to_orbax(
            FLAGS.source, FLAGS.input, FLAGS.output, add_eot=FLAGS.add_eot, vocab_multiple=FLAGS.vocab_multiple,
            param_dtype=FLAGS.param_dtype, overwrite=FLAGS.overwrite, tokenizer=FLAGS.tokenizer,
            config=model_config(FLAGS.config) if FLAGS.config is not None else None)
        mb = report["bytes_read"] / 1e6
        print(f"wrote {report['output']}: {mb:.1f} MB read in {report['seconds']:.1f} s "
              f"({mb / report['seconds']:.1f} MB/s); vocab {report['model'].vocab_size} "
              f"padded to {report['model'].padded_vocab_size}; "
              f"{'tokenizer stored' if report['tokenizer'] else 'no tokenizer stored'}")


if __name__ == "__main__":
    cli.run(main)  # ConversionError, existing or missing paths: one line, exit 2
