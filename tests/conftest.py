import sys
from pathlib import Path

import pytest

# Every room's folder on the path, as tests/ is: a few tests reuse another room's fixtures by
# importing its module (a fake served engine, a pipeline spec, two routed teachers).
for room in sorted(p for p in Path(__file__).resolve().parent.iterdir() if p.is_dir() and p.name != "vllm"
                   and not p.name.startswith((".", "_"))):
    if str(room) not in sys.path:
        sys.path.append(str(room))

from helpers import TINY_RUN  # noqa: E402
from opd.config import load_config  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Pretrained tiny models are cached under OPD_CACHE: keep the tests' cache private."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OPD_CACHE", str(tmp_path_factory.mktemp("opd_cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture
def tiny_config(tmp_path):
    def make(*overrides, run_dir=None):
        return load_config(None, [f"run_dir={run_dir or tmp_path / 'run'}", *TINY_RUN, *overrides])

    return make
