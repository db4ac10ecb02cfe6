"""Every test runs on 8 emulated CPU devices; these must be set before JAX is imported.

`JAX_PLATFORMS=cuda pytest tests/test_attention.py` runs the GPU kernel checks, which skip on CPU."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Tests ask servers from many threads at once; openai's lazily built reply models are not safe to
# build from several threads (see lima_jax/evaluation/client.py), so build them at import.
os.environ.setdefault("DEFER_PYDANTIC_BUILD", "false")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("LIMA_SHARED_DIR") or ROOT.parent / "shared")  # a worktree elsewhere names it


# XLA:CPU spends most of a tiny model's compile in LLVM's optimisations: a process that compiles
# much and runs little (a few steps) finishes about twice as fast unoptimised; one that runs long
# (a 45-step run, a sampling loop) finishes slower, so it is chosen per process.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu_env(devices: int, fast_compile: bool = False, **extra: str) -> dict:
    """The environment of a process a test starts: `devices` emulated CPU devices."""
    flags = f"{FAST_COMPILE if fast_compile else ''} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)


# The longest files, longest first (measured under `pytest -n 2 --dist loadfile`): handing them out
# first, the other worker works through the short files meanwhile and neither waits on one long
# file at the end (xdist's own order, most tests first, left a worker idle for minutes).
SLOW_FIRST = ("test_train_e2e.py", "test_lora_e2e.py", "test_lora.py", "test_train_recipe.py", "test_train_formats.py",
              "test_serving.py", "test_serving_api.py", "test_llama3_chat.py", "test_model_families.py", "test_data_grouping.py",
              "test_checkpoint_integrity.py", "test_model_store.py", "test_chat_format.py",
              "test_sharding.py", "test_gcs.py", "test_aot.py", "test_judge.py", "test_cli_errors.py",
              "test_serving_multiprocess.py", "test_convert_sampling.py", "test_sampling_file.py", "test_annotate.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order SLOW_FIRST sets
        config.option.loadscopereorder = False
    config.addinivalue_line("markers", "needs_shared: reads ../shared (the real LIMA data and LLaMA tokenizer, "
                                       "never copied into the project); skipped, and reported, where it is absent")


def pytest_report_header(config):
    return f"../shared: {'present' if SHARED.is_dir() else f'ABSENT ({SHARED}): needs_shared tests are skipped'}"


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
    for item in items:  # every test that takes the shared_dir fixture is marked, so -m selects it
        if "shared_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_shared)


@pytest.fixture(scope="session")
def shared_dir():
    """../shared; the test is skipped (with the reason in the report) where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"needs_shared: {SHARED} is absent")
    return SHARED


@pytest.fixture(autouse=True)
def stop_launched_runs():
    """A run a test launched (tests/tiny_run.launch) does not outlive it, even when an assertion
    failed while it ran (CI must end clean)."""
    yield
    from tests import tiny_run

    for proc in tiny_run.LAUNCHED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tiny_run.LAUNCHED.clear()


@pytest.fixture(params=[False, True], ids=["head-major", "position-major"])
def kv_position_major(request):
    """Both KV cache layouts (lima_jax.model.kv_cache.Layout), whichever this backend's: for
    ModelConfig.kv_position_major."""
    return request.param
