"""One TRL run for benchmarks/vs_trl.py: TRL's DistillationTrainer (beta=1: reverse KL, fully
on-policy) on the same models, prompts (in the same order), lengths and optimizer as opd.

    .venv-trl/bin/python benchmarks/trl_distill.py SPEC.json OUT.json

Runs in TRL's own environment (make bench-trl builds .venv-trl), so it imports nothing from opd.
SPEC (written by vs_trl.py): student, teacher (model directories), prompts (chat messages, one
entry per sampled row: each prompt repeated `samples` times, step after step), prompt_ids (what
opd tokenised: checked equal here), steps, lr, max_new_tokens, rows_per_step, lora_rank, threads,
gradient_checkpointing. OUT: per step its wall time (on_step_begin -> on_step_end: generation,
loss and optimizer), sampled completion tokens and loss (the token-mean reverse KL), and the
torch thread count.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    import torch

    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["student"], padding_side="left", truncation_side="left")
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for m in spec["prompts"][:spec["rows_per_step"]]]
    if [list(i) for i in ids] != spec["prompt_ids"]:
        sys.exit("TRL's tokenizer gives other prompt ids than opd's: the comparison would not be fair")
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    # TRL at its best where bf16 is native: mixed precision (bf16=True) and the teacher in bf16
    bf16 = spec.get("bf16", False)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.bfloat16 if bf16 else torch.float32)
    peft_config = None
    if spec["lora_rank"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    config = DistillationConfig(
        output_dir=spec["output_dir"], report_to="none", save_strategy="no", logging_steps=1,
        max_steps=spec["steps"], per_device_train_batch_size=spec["rows_per_step"], gradient_accumulation_steps=1,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.98, max_grad_norm=1.0, optim="adamw_torch",
        bf16=bf16, fp16=False, use_cpu=True, dataloader_num_workers=0, shuffle_dataset=False,
        gradient_checkpointing=spec["gradient_checkpointing"],
        beta=1.0, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=spec["max_new_tokens"],
        disable_tqdm=True, seed=0,
    )
    steps = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"step": state.global_step, "s": time.perf_counter() - self.start,
                          "threads": torch.get_num_threads()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]
                steps[-1]["tokens"] = round(logs["completions/mean_length"] * spec["rows_per_step"])

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}),
                                  processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimes()])
    trainer.train()
    json.dump({"steps": steps, "trl": trl.__version__, "torch": torch.__version__}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
