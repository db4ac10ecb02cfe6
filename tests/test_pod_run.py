"""launch/pod_run.sh against a stand-in `gcloud` put first on PATH. The stand-in records every
call and plays a slice of workers, each a folder used as its home: `scp` copies into every
worker's home, `ssh --worker=all --command C` runs C with bash in every worker's home, where
`pip` and `python` are stand-ins too that record their arguments and working directory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

WORKERS = 2
# An argument with spaces, quotes, shell syntax, a newline and an empty one: each must arrive whole.
COMMAND = ["python", "launch/tpu_train.py", "--config", "configs/llama65b.py", "--workdir", "gs://bucket/lima 65b",
           "--config.data.train_path=gs://bucket/lima/train.jsonl", "--config.train.note=it's \"two\" $HOME `id` *",
           "line one\nline two", ""]

GCLOUD = """\
#!{python}
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
workers = sorted(os.path.join(os.environ["FAKE_SLICE"], w) for w in os.listdir(os.environ["FAKE_SLICE"]))
chosen = [a.split("=", 1)[1] for a in args if a.startswith("--worker=")]
if chosen and chosen[0] != "all":
    workers = [workers[int(chosen[0])]]
record = {{"args": args, "runs": []}}
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    source, target = args[4], args[5].split(":", 1)[1]
    for home in workers:
        shutil.copy(source, os.path.join(home, target))  # a relative remote path is in the home folder
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = args[args.index("--command") + 1]
    for home in workers:
        env = dict(os.environ, HOME=home, PATH=os.environ["FAKE_WORKER_BIN"] + os.pathsep + os.environ["PATH"])
        done = subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True)
        record["runs"].append({{"worker": home, "command": command, "rc": done.returncode, "stderr": done.stderr}})
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
sys.exit(max([r["rc"] for r in record["runs"]], default=0))
"""

RECORDER = """\
#!{python}
import json, os, sys

with open(os.path.join(os.environ["HOME"], "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "cwd": os.getcwd(), "argv": sys.argv[1:]}}) + "\\n")
"""


def executable(path, text):
    path.write_text(textwrap.dedent(text).format(python=sys.executable))
    path.chmod(0o755)


@pytest.fixture
def slice_env(tmp_path):
    """(environment for pod_run.sh, worker homes, gcloud call log)."""
    bin_dir, worker_bin, slice_dir = tmp_path / "bin", tmp_path / "worker_bin", tmp_path / "slice"
    for folder in (bin_dir, worker_bin, slice_dir):
        folder.mkdir()
    executable(bin_dir / "gcloud", GCLOUD)
    for prog in ("pip", "python"):
        executable(worker_bin / prog, RECORDER)
    homes = [slice_dir / f"worker{i}" for i in range(WORKERS)]
    for home in homes:
        home.mkdir()
    log = tmp_path / "gcloud.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLICE=str(slice_dir),
               FAKE_WORKER_BIN=str(worker_bin), FAKE_GCLOUD_LOG=str(log), TMPDIR=str(tmp_path))
    return env, homes, log


def pod_run(env, *args):
    return subprocess.run(["bash", str(ROOT / "launch" / "pod_run.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("project", [None, "my-project"])
def test_copies_installs_and_runs_the_exact_command_on_every_worker(slice_env, project):
    env, homes, log = slice_env
    proc = pod_run(env, "my-tpu", "us-central2-b", *([project] if project else []), "--", *COMMAND)
    assert proc.returncode == 0, proc.stderr

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["args"][3] for c in calls] == ["scp", "ssh", "ssh"]
    where = ["--zone", "us-central2-b", *(["--project", project] if project else [])]
    for call in calls:
        args = call["args"]
        assert "--worker=all" in args and args[args.index("--zone"):][:len(where)] == where
        assert ("--project" in args) == bool(project)
    assert calls[0]["args"][5] == "my-tpu:lima_jax.tgz"
    assert all(c["args"][4] == "my-tpu" for c in calls[1:])
    assert all(len(c["runs"]) == WORKERS for c in calls[1:])

    for home in homes:
        checkout = home / "lima_jax"
        assert (checkout / "launch" / "pod_run.sh").is_file() and (checkout / "lima_jax" / "storage.py").is_file()
        assert (checkout / "pyproject.toml").read_text() == (ROOT / "pyproject.toml").read_text()
        assert not (checkout / ".git").exists() and not (home / "lima_jax.tgz").exists()
        ran = [json.loads(line) for line in (home / "calls.jsonl").read_text().splitlines()]
        assert ran == [{"prog": "pip", "cwd": str(checkout), "argv": ["install", "-q", "-e", ".[tpu]"]},
                       {"prog": "python", "cwd": str(checkout), "argv": COMMAND[1:]}]
    assert not list(log.parent.glob("lima_jax.*")), "the local tarball is left behind"


def test_usage_errors(slice_env):
    env, _, log = slice_env
    for args in ([], ["my-tpu"], ["my-tpu", "us-central2-b", "--"]):
        proc = pod_run(env, *args)
        assert proc.returncode == 2 and "usage:" in proc.stderr
    assert not log.exists()


def test_a_failing_worker_fails_the_launch(slice_env):
    env, homes, log = slice_env
    proc = pod_run(env, "my-tpu", "us-central2-b", "--", "false")
    assert proc.returncode != 0
    assert [json.loads(line)["args"][3] for line in log.read_text().splitlines()] == ["scp", "ssh", "ssh"]
