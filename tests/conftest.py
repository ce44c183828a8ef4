import pytest

from helpers import TINY_RUN
from opd.config import load_config


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
