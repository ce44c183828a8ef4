"""The learner on several processes (issue 12): 2 processes under torchrun, gloo on the CPU.

Each test launches `python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py`
on 127.0.0.1 and a free port, with a timeout; the work each process does is in that file.
FSDP2 runs on gloo here (gradients are summed with a plain all-reduce / reduce-scatter).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_RUN, torchrun
from opd.config import ConfigError, load_config
from opd.learner import distributed
from opd.learner.checkpoint import latest_checkpoint
from opd.loop import train

HERE = Path(__file__).resolve().parents[1]  # tests/: distributed_worker.py
# A random teacher (no pretraining in every fresh process) and a small evaluation set.
QUICK = ["teacher.tiny.pretrain_steps=0", "data.eval_holdout=4"]
TIMING_KEYS = {"sample_s", "score_s", "train_s", "sync_s", "wall_s_total", "sample_s_total", "score_s_total", "train_s_total",
               "eval_s_total"}


def weights(run_dir: Path, step: int, lora: bool = False) -> dict:
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model" / name))


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_each_rank_takes_its_contiguous_share_and_an_uneven_batch_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.share(list(range(8))) == [4, 5, 6, 7]
    with pytest.raises(ConfigError, match="batch of 7 does not split evenly over 2 processes"):
        distributed.share(list(range(7)))


def test_step_metrics_are_of_the_global_batch(monkeypatch):
    """Counts, FLOPs and phase times add up; per-token means are weighted by tokens; row means are
    averaged (ranks hold equal numbers of rows); values equal on every rank are kept exactly."""
    ranks = [{"tokens": 30, "teacher_kl": 1.0, "completion_len": 10.0, "loss": 0.5, "skipped": 0,
              "flops_train": 100, "sample_s": 1.0, "groups_all_equal": 1},
             {"tokens": 10, "teacher_kl": 3.0, "completion_len": 6.0, "loss": 0.5, "skipped": 0,
              "flops_train": 50, "sample_s": 2.0, "groups_all_equal": 0}]
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: ranks)
    combined = distributed.combine_metrics(ranks[0])
    assert combined == {"tokens": 40, "teacher_kl": 1.5, "completion_len": 8.0, "loss": 0.5, "skipped": 0,
                        "flops_train": 150, "sample_s": 3.0, "groups_all_equal": 1}
    assert isinstance(combined["skipped"], int)
    # several teachers: a teacher with rows on one rank only still shows; its KL is over its own tokens
    ranks = [{"tokens": 30, "tokens/math": 1.0, "teacher_kl/math": 2.0, "tokens/chat": 0.0},
             {"tokens": 10, "tokens/math": 0.5, "teacher_kl/math": 4.0, "tokens/chat": 0.5, "teacher_kl/chat": 1.0}]
    combined = distributed.combine_metrics(ranks[0])
    assert combined == pytest.approx({"tokens": 40, "tokens/math": 35 / 40, "teacher_kl/math": (60 + 20) / 35,
                                      "tokens/chat": 5 / 40, "teacher_kl/chat": 1.0})


def test_one_step_gradients_of_two_ranks_equal_one_rank(tmp_path):
    """Sampled loss, exact loss and SFT, DDP and FSDP2: each of 2 ranks holds half of the global
    batch (in 2 micro-batches); the summed gradient is the gradient of one process with it all."""
    sys.path.insert(0, str(HERE))
    from distributed_worker import one_step_gradients

    torchrun("grads", tmp_path / "grads.pt")
    two_ranks = torch.load(tmp_path / "grads.pt")
    assert set(two_ranks) == {f"{o}/{s}" for o in ("policy_gradient", "divergence", "cross_entropy")
                              for s in ("ddp", "fsdp2")}
    one_rank = {o: one_step_gradients(o, "ddp") for o in ("policy_gradient", "divergence", "cross_entropy")}
    for key, grads in two_ranks.items():
        reference = one_rank[key.split("/")[0]]
        assert grads.keys() == reference.keys() and len(grads) > 10, key
        for name in reference:
            assert torch.allclose(grads[name], reference[name], rtol=1e-5, atol=1e-8), (key, name)


def test_ddp_lora_sft_matches_one_rank_and_resumes_bit_identically(tiny_config, tmp_path):
    """SFT (no sampling: the same batches whatever the number of processes), LoRA, DDP: a 2-rank
    run ends with the weights of the 1-rank run; stopped after 2 steps and resumed under torchrun,
    it is bit-identical to the uninterrupted 2-rank run; the gathered adapter loads with peft."""
    from peft import PeftModel

    from opd.tiny import build_tiny_model, build_tiny_tokenizer

    settings = ["method=sft", "teacher=null", "task.name=arithmetic", "task.train_size=64", "task.eval_size=4", "train.steps=4",
                "train.micro_batch_size=2", "student.lora.rank=4", "optim.lr=1e-2", "train.strategy=ddp"]
    train(tiny_config(*settings, run_dir=tmp_path / "one"))
    torchrun("train", tmp_path / "straight", *settings)
    torchrun("train", tmp_path / "split", "--stop-after", 2, *settings)
    torchrun("train", tmp_path / "split", "--resume", *settings)

    one, straight, split = (weights(tmp_path / d, 4, lora=True) for d in ("one", "straight", "split"))
    assert one.keys() == straight.keys() == split.keys() and one
    for name in one:
        assert torch.equal(straight[name], split[name]), name  # resume: bit-identical
        assert torch.allclose(straight[name], one[name], rtol=1e-4, atol=1e-6), name  # 2 ranks = 1 rank
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "split")
    rows = metrics(tmp_path / "straight")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["tokens_trained_total"] == metrics(tmp_path / "one")[-1]["tokens_trained_total"]

    cfg = load_config(tmp_path / "straight" / "config.yaml")
    base = build_tiny_model(cfg.student.tiny, build_tiny_tokenizer())
    model = PeftModel.from_pretrained(base, tmp_path / "straight" / "checkpoints" / "step_000004" / "model")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(straight)


def test_fsdp2_distill_ctrl_c_on_one_rank_then_resume_is_bit_identical(tiny_config, tmp_path):
    """A real SIGINT to rank 1 during step 2: both ranks finish step 2, save it and stop; --resume
    under torchrun then ends bit-identical to an uninterrupted 2-rank run (evaluations on the way:
    the sharded model also samples and evaluates). The gathered checkpoint loads with plain
    transformers; resuming it on another number of processes is refused, naming both."""
    from transformers import AutoModelForCausalLM

    settings = ["train.steps=4", "train.strategy=fsdp2", "log.rollouts_every=2", "eval.every=2", *QUICK]
    torchrun("train", tmp_path / "straight", *settings)
    torchrun("train", tmp_path / "split", "--rank", 1, "--at-step", 2, "--then", "sigint", *settings)
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps_done"] == 2
    assert latest_checkpoint(tmp_path / "split").name == "step_000002"
    torchrun("train", tmp_path / "split", "--resume", *settings)

    a, b = weights(tmp_path / "straight", 4), weights(tmp_path / "split", 4)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "split")
    assert (tmp_path / "split" / "rollouts" / "step_000004.jsonl").is_file()  # rank 0 wrote the rollouts

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "checkpoints" / "step_000004" / "model")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, a[name]), name

    with pytest.raises(ConfigError, match="written by 2 processes and this run has 1"):
        train(tiny_config(*settings, "train.steps=5", run_dir=tmp_path / "split"), resume=True)


def test_a_rank_that_dies_ends_the_job_and_keeps_the_checkpoint(tmp_path):
    """Rank 1 exits in the middle of the run: torchrun ends the job (no hang) with an error that
    names the rank, and the last checkpoint is complete."""
    run_dir = tmp_path / "run"
    done = torchrun("train", run_dir, "--rank", 1, "--at-step", 3, "--then", "die", "train.steps=6",
                    "checkpoint.every=1", *QUICK, check=False, timeout=180)
    assert done.returncode != 0
    assert "rank      : 1" in done.stderr and "exitcode  : 3" in done.stderr
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint.name == "step_000002"
    assert load_file(str(checkpoint / "model" / "model.safetensors"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs (none here)")
def test_nccl_gradients_of_two_ranks_equal_one_rank(tmp_path):
    sys.path.insert(0, str(HERE))
    from distributed_worker import one_step_gradients

    torchrun("grads", tmp_path / "grads.pt", "--device", "cuda")
    for key, grads in torch.load(tmp_path / "grads.pt").items():
        reference = one_step_gradients(key.split("/")[0], "ddp", torch.device("cuda"))
        for name in reference:
            assert torch.allclose(grads[name], reference[name], rtol=1e-4, atol=1e-6), (key, name)


def test_routed_teachers_under_ddp_route_every_ranks_share_and_resume_exactly(tmp_path):
    """Several teachers under torchrun: each rank routes the rows of its share to their teachers; the
    per-teacher metrics are of the global batch, and a run stopped and resumed ends bit-identical."""
    sys.path.insert(0, str(HERE))
    from test_teacher_router import SOURCES, SMALL_TASKS, TWO_TEACHERS

    settings = ["teacher=null", *TWO_TEACHERS, "teachers.math.tiny.pretrain_steps=0",
                "teachers.chat.tiny.pretrain_steps=0", SOURCES, *SMALL_TASKS, "train.steps=3", "train.strategy=ddp",
                "log.rollouts_every=0", "eval.every=0"]
    torchrun("train", tmp_path / "straight", *settings)
    torchrun("train", tmp_path / "split", "--stop-after", 2, *settings)
    torchrun("train", tmp_path / "split", "--resume", *settings)
    a, b = weights(tmp_path / "straight", 3), weights(tmp_path / "split", 3)
    assert a.keys() == b.keys() and a and all(torch.equal(a[n], b[n]) for n in a)
    rows = metrics(tmp_path / "straight")
    assert rows == metrics(tmp_path / "split")
    step = rows[1]
    assert step["tokens/math"] + step["tokens/chat"] == pytest.approx(1.0) and step["tokens/chat"] > 0
    mean = step["tokens/math"] * step["teacher_kl/math"] + step["tokens/chat"] * step["teacher_kl/chat"]
    assert step["teacher_kl"] == pytest.approx(mean, rel=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp2_rank0_alone_reads_the_student_and_every_rank_gets_its_weights(tmp_path, lora):
    """FSDP2 (issue 33): rank 1 builds the student on the meta device (reads no weights) and receives
    its shards from rank 0; the whole model, buffers included, is then exactly the one process's."""
    from opd.components import build

    extra = ["student.lora.rank=4"] if lora else []
    torchrun("build", tmp_path / "built.pt", *extra)
    built = torch.load(tmp_path / "built.pt")
    assert built["read"] == [[True, True], [True, False]]  # (teacher, student) per rank: the teacher is replicated
    torch.manual_seed(0)  # as the worker: LoRA's A matrices are drawn from the global generator
    reference = build(load_config(None, [f"run_dir={tmp_path / 'one'}", *TINY_RUN, *extra])).learner.model
    expected = reference.state_dict()
    assert built["state"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(built["state"][name], tensor), name
    for buffers in built["buffers"]:  # non-persistent buffers (rotary frequencies) too, on both ranks
        for name, tensor in reference.named_buffers():
            assert torch.equal(buffers[name], tensor), name
    assert torch.equal(built["greedy"][0], built["greedy"][1])


def test_what_a_sampler_cannot_do_under_torchrun_is_refused_before_any_work(monkeypatch):
    from opd.components import check_distributed_sampling

    class Sharded:
        strategy = "fsdp2"

    monkeypatch.setattr(distributed, "active", lambda: True)
    served = [*TINY_RUN, "sampling.backend=vllm", "sampling.url=http://127.0.0.1:9"]
    with pytest.raises(ConfigError, match="weight_sync=nccl under torchrun is not supported yet"):
        check_distributed_sampling(load_config(None, [*served, "sampling.weight_sync=nccl"]), learner=None)
    check_distributed_sampling(load_config(None, served), Sharded())  # FSDP2, full weights: rank 0 exports
    with pytest.raises(ConfigError, match="LoRA student and a served sampler"):
        check_distributed_sampling(load_config(None, [*served, "student.lora.rank=4"]), Sharded())
    with pytest.raises(ConfigError, match="train.max_staleness=0 only"):
        check_distributed_sampling(load_config(None, [*served, "train.max_staleness=1"]), Sharded())
    with pytest.raises(ConfigError, match="serve the student"):  # a colocated engine needs the whole weights
        check_distributed_sampling(load_config(None, [*TINY_RUN, "sampling.backend=vllm"]), Sharded())
