"""Test-wide settings: offline hub, no telemetry, a private HF cache, few threads."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setenv("HF_HOME", str(cache / "home"))
    yield


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """Tiny models run fastest single-threaded (and shared CI cores make 2 threads erratic)."""
    import torch

    torch.set_num_threads(int(os.environ.get("DIFFALIGN_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    """Longest first: a slow test may say `@pytest.mark.slow(minutes=N)` (its CI time on one core), a long test of the
    default run `@pytest.mark.minutes(N)`, and those run before the rest, longest first, so pytest-xdist's workers do
    not end on one long test while the other idles. The order is the same in every worker (xdist requires it)."""

    def minutes(item):
        slow, long = item.get_closest_marker("slow"), item.get_closest_marker("minutes")
        return long.args[0] if long else slow.kwargs.get("minutes", 0) if slow else 0

    items.sort(key=lambda item: -minutes(item))  # stable: the rest keep their collection order
