"""The converters' refusals: an output equal to or inside the input (or, with --overwrite, an
input inside the output) and a temporary folder they did not create, which is left as it was;
and the tokenizer stored at conversion (the folder's, --tokenizer's, a warning if none, a
tokenizer of another model refused)."""

import logging
import subprocess
import sys

import pytest

from lima_jax import model_store
from lima_jax.convert import ConversionError, convert_to_orbax, export_hf
from tests.conftest import ROOT
from tests.convert_fixtures import CONVERT_MHA as MHA, stored_proto, train_tokenizer
from tests.references import hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "hf"
    hf_model(MHA, seed=6).save_pretrained(path)
    (path / "tokenizer.model").write_bytes(train_tokenizer(MHA.vocab_size))
    return path


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    convert_to_orbax("hf", hf_dir, path)
    return path


def files(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_convert_refuses_an_output_in_its_input(hf_dir, tmp_path):
    before = files(hf_dir)
    for output, overwrite, message in ((hf_dir, True, "is the input"), (hf_dir / "ckpt", False, "inside the input"),
                                       (hf_dir.parent, True, "--overwrite would delete the input")):
        with pytest.raises(ConversionError, match=message):
            convert_to_orbax("hf", hf_dir, output, overwrite=overwrite)
    assert files(hf_dir) == before


def test_export_refuses_an_output_in_its_input(ckpt):
    before = files(ckpt)
    for output, overwrite, message in ((ckpt, True, "is the input"), (ckpt / "0" / "hf", False, "inside the input"),
                                       (ckpt.parent, True, "--overwrite would delete the input")):
        with pytest.raises(ConversionError, match=message):
            export_hf(ckpt, output, overwrite=overwrite)
    assert files(ckpt) == before


def test_foreign_temporary_folders_are_refused_and_kept(hf_dir, ckpt, tmp_path):
    for name in ("hf.tmp-export", "ckpt.tmp-convert"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("not the converter's")
    with pytest.raises(ConversionError, match=r"hf\.tmp-export already exists .*remove it yourself"):
        export_hf(ckpt, tmp_path / "hf")
    with pytest.raises(FileExistsError, match=r"ckpt\.tmp-convert already exists .*remove it yourself"):
        convert_to_orbax("hf", hf_dir, tmp_path / "ckpt")
    for name in ("hf.tmp-export", "ckpt.tmp-convert"):
        assert (tmp_path / name / "notes.txt").read_text() == "not the converter's"
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ckpt").exists()


def test_cli_overwrite_onto_its_input_exits_with_a_message(hf_dir):
    before = files(hf_dir)
    cmd = [sys.executable, str(ROOT / "launch" / "convert_checkpoint.py"), "--source", "hf", "--input", str(hf_dir),
           "--output", str(hf_dir), "--overwrite"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "is the input" in result.stderr and "Traceback" not in result.stderr
    assert files(hf_dir) == before


def test_tokenizer_stored_explicit_wins_and_missing_warns(hf_dir, tmp_path, caplog):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((hf_dir / "tokenizer.model").read_bytes())
    proto.trainer_spec.model_prefix = "explicit"  # the same pieces, other bytes: which one was stored shows
    other = tmp_path / "explicit.model"
    other.write_bytes(proto.SerializeToString())
    assert other.read_bytes() != (hf_dir / "tokenizer.model").read_bytes()
    report = convert_to_orbax("hf", hf_dir, tmp_path / "a", tokenizer=other)
    assert report["tokenizer"] and stored_proto(model_store.read_meta(tmp_path / "a")) == other.read_bytes()

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in hf_dir.iterdir():
        if f.name != "tokenizer.model":
            (bare / f.name).write_bytes(f.read_bytes())
    with caplog.at_level(logging.WARNING):
        report = convert_to_orbax("hf", bare, tmp_path / "b")
    assert not report["tokenizer"] and model_store.read_meta(tmp_path / "b").tokenizer is None
    assert "no tokenizer.model beside the weights and no --tokenizer" in caplog.text


def test_tokenizer_of_another_model_is_refused_at_conversion(hf_dir, tmp_path):
    (tmp_path / "big.model").write_bytes(train_tokenizer(256))
    with pytest.raises(ConversionError, match=r"big\.model has 256 pieces but .*config\.json has vocab_size=248"):
        convert_to_orbax("hf", hf_dir, tmp_path / "ckpt", tokenizer=tmp_path / "big.model")
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConversionError, match=r"junk\.model is not a SentencePiece model"):
        convert_to_orbax("hf", hf_dir, tmp_path / "ckpt", tokenizer=tmp_path / "junk.model")
    assert not (tmp_path / "ckpt").exists()
