"""What tests/learner/test_distributed.py runs under torchrun (or in its own process, as one rank).

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py grads OUT.pt
    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py train RUN_DIR [--resume]
        [--stop-after K] [--rank R --at-step K --then sigint|die] key=value ...

`grads`: one optimizer step of each loss (sampled reverse KL, exact reverse KL, SFT cross-entropy)
with each strategy (ddp, fsdp2) on a fixed global batch of 8 rows, each rank holding its share;
the gradients (gathered whole) are written by rank 0. `train`: a tiny run (tests/helpers.TINY_RUN);
`--then sigint` sends Ctrl-C to rank R when step K begins, `--then die` ends rank R there (exit 3),
`--then kill-server --server-pgid G` kills the served teacher's process group there.
"""

import argparse
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from helpers import TINY_RUN, tiny  # noqa: E402
from opd.config import LossConfig, OptimConfig, SamplingConfig, load_config  # noqa: E402
from opd.learner import distributed  # noqa: E402
from opd.learner.learner import Learner  # noqa: E402
from opd.rollouts import sequence_batch  # noqa: E402
from opd.sampler.hf import HFSampler  # noqa: E402
from opd.teacher.hf import HFTeacher  # noqa: E402

ROWS = 8  # the global batch


def fixed_batches(device):
    """The same global batches on every rank: student samples (seeded), teacher scores, and SFT
    sequences of different lengths."""
    student, tokenizer = tiny(hidden=32, seed=1)
    teacher_model, _ = tiny(hidden=32, seed=2)
    teacher = HFTeacher(teacher_model.to(device), tokenizer)
    prompts = [tokenizer(f"question {i}: what is {i} + {i}?").input_ids for i in range(ROWS // 2)]
    torch.manual_seed(0)
    rollouts = HFSampler(student.to(device), tokenizer,
                         SamplingConfig(samples_per_prompt=2, max_new_tokens=12)).sample(prompts)
    sequences = [tokenizer(f"sentence number {i} " + "and more words " * i).input_ids for i in range(ROWS)]
    sft = sequence_batch(sequences, [3] * ROWS, tokenizer.pad_token_id, device)
    return tokenizer, rollouts, teacher, sft


def one_step_gradients(objective: str, strategy: str, device=torch.device("cpu")) -> dict:
    """The gradient of one step of `objective` on this rank's share of the fixed global batch,
    gathered whole (names -> tensors, on the CPU)."""
    tokenizer, rollouts, teacher, sft = fixed_batches(device)
    model, _ = tiny(hidden=32, seed=1)
    model.to(device)
    kind = "reverse_kl" if objective == "divergence" else "sampled_reverse_kl"
    learner = Learner(model, OptimConfig(grad_clip=None, warmup_steps=0), LossConfig(kind=kind), total_steps=1,
                      micro_batch_size=2, objective=objective)
    distributed.wrap(learner, strategy)
    rows = distributed.share(list(range(ROWS)))
    mine = slice(rows[0], rows[-1] + 1)
    batch = (sft if objective == "cross_entropy" else rollouts).rows(mine)
    advantages = scores = None
    if objective == "policy_gradient":
        teacher_logprobs = teacher.score(rollouts).logprobs  # the whole batch, as one process would
        advantages = -(rollouts.behaviour_logprobs - teacher_logprobs)[mine] * rollouts.completion_mask[mine]
    elif objective == "divergence":
        scores = teacher.score(batch, keep_hidden=True)

    captured = {}

    def record_then_step(*args, **kwargs):  # the gradients as the optimizer sees them
        for name, p in learner.model.named_parameters():
            if p.grad is not None:
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                captured[name] = grad.detach().cpu().clone()
        return original_step(*args, **kwargs)

    original_step = learner.optimizer.step
    learner.optimizer.step = record_then_step
    metrics = learner.train_step(batch, advantages, scores)
    captured["__loss__"] = torch.tensor(metrics["loss"])
    return captured


def built_shards(path, overrides) -> None:
    """`build` under FSDP2: which ranks read the student's weights, and the whole model (weights and
    buffers) as every rank holds it after sharding, written by rank 0."""
    import opd.components
    from opd.learner.distributed import full_model_state

    read = []
    load_model = opd.components.load_model

    def recording(spec, device, tokenizer=None, weights=True):
        read.append(weights)
        return load_model(spec, device, tokenizer, weights=weights)

    opd.components.load_model = recording
    cfg = load_config(None, [f"run_dir={path}.run", *TINY_RUN, "train.strategy=fsdp2", *overrides])
    torch.manual_seed(0 if distributed.is_main() else 1)  # LoRA's initial A: rank 0's must be what every rank gets
    components = opd.components.build(cfg)
    learner = components.learner
    state = full_model_state(learner)
    buffers = distributed.gather_objects({n: b.cpu() for n, b in learner.model.named_buffers()})
    read_by = distributed.gather_objects(read)
    probe = components.tokenizer("1 + 1 =").input_ids  # the sampler gathers the shards: the same model on every rank
    greedy = components.sampler.sample([probe], samples_per_prompt=1, max_new_tokens=4, greedy=True).tokens
    greedy = distributed.gather_objects(greedy.cpu())
    if distributed.is_main():
        torch.save({"read": read_by, "state": state, "buffers": buffers, "greedy": greedy}, path)
    components.close()
    distributed.shutdown(learner)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["grads", "train", "build"])
    parser.add_argument("path")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--strategies", default="ddp,fsdp2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--at-step", type=int)
    parser.add_argument("--then", choices=["sigint", "die", "kill-server"])
    parser.add_argument("--server-pgid", type=int, help="--then kill-server: the served teacher's process group")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    if args.command == "grads":
        device = distributed.init(torch.device(args.device))
        results = {f"{objective}/{strategy}": one_step_gradients(objective, strategy, device)
                   for strategy in args.strategies.split(",")
                   for objective in ("policy_gradient", "divergence", "cross_entropy")}
        if distributed.is_main():
            torch.save(results, args.path)
        distributed.shutdown()
        return
    if args.command == "build":
        distributed.init(torch.device(args.device))
        built_shards(args.path, args.overrides)
        return
    import opd.loop

    if args.then:
        run_step = opd.loop.run_step

        def interrupted_step(cfg, components, step, *rest):
            if step == args.at_step and distributed.rank() == args.rank:
                if args.then == "die":
                    os._exit(3)
                if args.then == "kill-server":  # kill -9 the served teacher (every process of it) before this step
                    os.killpg(args.server_pgid, signal.SIGKILL)
                    return run_step(cfg, components, step, *rest)
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, to this rank only
            return run_step(cfg, components, step, *rest)

        opd.loop.run_step = interrupted_step
    cfg = load_config(None, [f"run_dir={args.path}", *TINY_RUN, *args.overrides])
    opd.loop.train(cfg, resume=args.resume, stop_after=args.stop_after)


if __name__ == "__main__":
    main()
