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
SHARED = ROOT.parent / "shared"


# The end-to-end training runs are the longest files: schedule them first so that, under
# `pytest -n 2 --dist loadfile`, the other worker works through the short files meanwhile.
SLOW_FIRST = ("test_train_e2e.py", "test_train_recipe.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_shared: reads ../shared (the real LIMA data and LLaMA tokenizer, "
                                       "never copied into the project); skipped, and reported, where it is absent")


def pytest_report_header(config):
    return f"../shared: {'present' if SHARED.is_dir() else f'ABSENT ({SHARED}): needs_shared tests are skipped'}"


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in SLOW_FIRST)
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
