"""Every test runs on 8 emulated CPU devices; these must be set before JAX is imported.

`JAX_PLATFORMS=cuda pytest tests/test_attention.py` runs the GPU kernel checks, which skip on CPU."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


# The end-to-end training runs are the longest file: schedule them first so that, under
# `pytest -n 2 --dist loadfile`, the other worker works through the short files meanwhile.
SLOW_FIRST = ("test_train_e2e.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in SLOW_FIRST)


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is missing")
    return SHARED
