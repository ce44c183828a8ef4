import pytest

from opd.config import load_config


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Pretrained tiny models are cached under OPD_CACHE: keep the tests' cache private."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OPD_CACHE", str(tmp_path_factory.mktemp("opd_cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


# A run that takes a few seconds on 2 CPU cores: a random 32-wide student, a 64-wide teacher
# pretrained for 200 steps on the built-in conversations.
TINY_RUN = [
    "student.tiny.hidden_size=32", "student.tiny.seed=1",
    "teacher.tiny.hidden_size=64", "teacher.tiny.seed=2", "teacher.tiny.pretrain_steps=200",
    "train.prompts_per_step=4", "sampling.samples_per_prompt=4", "sampling.max_new_tokens=16",
    "train.micro_batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=2",
    "eval.every=0", "log.progress=false", "log.tensorboard=false", "checkpoint.every=0",
]


@pytest.fixture
def tiny_config(tmp_path):
    def make(*overrides, run_dir=None):
        return load_config(None, [f"run_dir={run_dir or tmp_path / 'run'}", *TINY_RUN, *overrides])

    return make
