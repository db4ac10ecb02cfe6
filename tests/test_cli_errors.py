"""Launch scripts report expected failures as one short message and exit 2 (lima_jax/cli.py);
the traceback only with LIMA_JAX_TRACEBACK=1. Each script runs as a real process on a real bad
input. Full disks are real: /dev/full, and a 64 KiB tmpfs (mounting needs root; skipped
otherwise)."""

import asyncio
import errno
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from lima_jax import cli
from tests.conftest import ROOT, cpu_env

PROGRESS_BAR = re.compile(r"^\s*\d+%\|")  # tqdm's lines, not part of the message


def launch(script: str, *args: str, traceback: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in cpu_env(8, fast_compile=True).items() if k != cli.TRACEBACK_ENV}  # each fails early
    if traceback:
        env[cli.TRACEBACK_ENV] = "1"
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], check=False, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


def assert_short(result: subprocess.CompletedProcess, *names: str, max_lines: int = 5) -> str:
    """Exit 2, no traceback, a few lines of stderr that end with the message naming `names`."""
    err = result.stderr
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS_BAR.search(line)]
    assert result.returncode == cli.EXIT_EXPECTED, err[-3000:]
    assert "Traceback" not in err and len(lines) <= max_lines, err[-3000:]
    message = "\n".join(lines[-3:])
    assert message.startswith("error: ") or "\nerror: " in message, err[-3000:]
    for name in names:
        assert name in message, (name, message)
    return message


def test_train_on_a_malformed_data_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"conversations": ["Hi", "Hello"]}\n{"conversations": ["Hi", \n')
    result = launch("tpu_train.py", "--config", "configs/tiny.py", f"--config.data.train_path={bad}",
                    "--workdir", str(tmp_path / "wd"))
    assert "bad data" in assert_short(result, f"{bad}:2")


def test_sample_from_a_missing_checkpoint(tmp_path):
    result = launch("sample.py", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "Hi")
    assert "missing" in assert_short(result, str(tmp_path / "nowhere"))


def test_aot_check_of_a_nonsense_topology_and_the_traceback_on_request():
    args = ("--config", "configs/tiny.py", "--topology", "v9-3")
    assert_short(launch("aot_check.py", *args), "v9-3")
    result = launch("aot_check.py", *args, traceback=True)
    assert result.returncode != 0 and "Traceback (most recent call last)" in result.stderr
    assert "parse_topology" in result.stderr and "v9-3" in result.stderr


def test_convert_to_an_existing_output(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = launch("convert_checkpoint.py", "--source", "hf", "--input", str(tmp_path / "hf"),
                    "--output", str(tmp_path / "out"))
    assert "exists" in assert_short(result, str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_what_counts_as_expected():
    from lima_jax.aot import parse_topology
    from lima_jax.errors import LimaError
    from lima_jax.train.loop import ResumeRefused

    def raised(fn, *args):
        try:
            fn(*args)
        except Exception as e:
            return e
        raise AssertionError("no exception")

    assert cli.describe(raised(parse_topology, "v9-3")).what == "bad config or input"  # lima_jax's own check
    assert cli.describe(raised(int, "x")) is None  # a ValueError deep in a library: a bug, keep the traceback
    assert cli.describe(raised(dict().__getitem__, "k")) is None
    assert cli.describe(ResumeRefused("checkpoint 30 was written by another run")).what == "resume refused"
    custom = type("Custom", (LimaError,), {"kind": "custom kind", "todo": "do this"})("what went wrong")
    assert (cli.describe(custom).what, cli.describe(custom).todo) == ("custom kind", "do this")  # by class, not name
    device_oom = ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB")
    assert cli.describe(device_oom) is None  # accelerator memory, not a disk


def test_a_refusal_keeps_its_fix_however_many_keys_changed():
    """A resume refused over 3+ changed keys is cut to MAX_DETAIL_LINES, but its last line (the
    --config.train.accept_changed fix) is printed; other messages are cut as before."""
    from lima_jax.errors import ResumeRefused

    changed = [f"  optimizer.key{i}: {i} -> {i + 1}" for i in range(5)]
    fix = 'Use another --workdir, or accept the change deliberately: --config.train.accept_changed="(\'optimizer\',)"'
    message = cli.describe(ResumeRefused("\n".join(["/w holds checkpoint 3 of a different run; changed:", *changed, fix])))
    assert message.what == "resume refused" and message.detail.splitlines()[-1] == fix
    assert len(message.detail.splitlines()) <= cli.MAX_DETAIL_LINES + 1 and "--config.train.accept_changed" in message.message()
    assert fix not in cli.describe(FileNotFoundError("\n".join([*changed, fix]))).detail  # not a LimaError: cut as before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_real_enospc_names_the_file():
    with pytest.raises(OSError) as info, open("/dev/full", "w") as f:
        f.write("x")
        f.flush()
    assert info.value.errno == errno.ENOSPC
    failure = cli.describe(info.value, ["tpu_train.py", "--workdir=/data/run"])
    assert failure.what == "disk full" and "/data/run" in failure.detail and "free space" in failure.todo


def test_a_real_unreachable_server_names_the_bucket():
    import aiohttp

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def get():
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}/storage/v1/b/my-bucket")

    with pytest.raises(aiohttp.ClientConnectionError) as info:
        asyncio.run(get())
    failure = cli.describe(info.value, ["sample.py", "--prompts", "gs://my-bucket/test.jsonl"])
    assert failure.what == "cannot reach storage" and "gs://my-bucket" in failure.detail
    with pytest.raises(ConnectionRefusedError) as info:  # not storage: e.g. a multi-process coordinator
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert cli.describe(info.value, ["tpu_train.py", f"--coordinator_address=127.0.0.1:{port}"]) is None


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: real ENOSPC from Python, tensorstore and Orbax alike."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=False,
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_tensorstore_on_a_full_disk(full_disk):
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(full_disk / "array")}}
    with pytest.raises(ValueError, match="RESOURCE_EXHAUSTED") as info:
        array = ts.open(spec, create=True, dtype=ts.float32, shape=[1 << 18]).result()
        array.write(np.random.default_rng(0).random(1 << 18, np.float32)).result()
    failure = cli.describe(info.value)
    assert failure.what == "disk full" and str(full_disk) in failure.detail


def test_training_into_a_full_disk(full_disk):
    """The first checkpoint (Orbax, tensorstore, several threads) does not fit: one message."""
    workdir = full_disk / "run"
    result = launch("tpu_train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
                    "--config.train.epochs=1", "--config.train.sample_dev_prompts=0")
    assert "disk full" in assert_short(result, str(full_disk), "free space")
