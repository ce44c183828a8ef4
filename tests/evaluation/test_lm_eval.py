"""lm-evaluation-harness through opd: the shipped local tasks run offline, a tiny model's harness
score equals opd's own greedy evaluation of the same rows, and without the extra `--lm-eval` is
one line with the install command."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from helpers import tiny
from opd.cli.main import app
from opd.config import EvalConfig, SamplingConfig
from opd.data import encode_prompts
from opd.evaluation import completion_text, evaluate_prompts
from opd.harness import TASK_DIR, metrics_of, offline_punkt, run_harness
from opd.sampler.hf import HFSampler

pytest.importorskip("lm_eval")

GSM8K_ROWS = [json.loads(line) for line in (TASK_DIR / "data" / "gsm8k_format_test.jsonl").read_text().splitlines()]


def _question(row):
    return f"Question: {row['question']}\nAnswer:"  # the shipped task's doc_to_text


def _gold(row):
    return row["answer"].split("#### ")[-1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on this shared 2-core machine, two threads spinning against other work made
    the tiny training below 18x slower (112 s against 6 s for 100 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory):
    """A tiny model taught to answer the shipped GSM8K-format questions, right on every other row
    and wrong on the rest, so that the score is neither 0 nor 1; saved as a Hugging Face folder."""
    model, tokenizer = tiny(hidden=32, seed=5)
    conversations = []
    for i, row in enumerate(GSM8K_ROWS):
        answer = _gold(row) if i % 2 == 0 else str(int(_gold(row)) + 3)
        conversations.append([{"role": "user", "content": _question(row)},
                              {"role": "assistant", "content": f"So it is {answer}. #### {answer}"}])
    encoded = [tokenizer.apply_chat_template(c, return_dict=True)["input_ids"] for c in conversations]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(encoded):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(100):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("lm_eval") / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model.eval(), tokenizer


MAX_NEW = 24


def test_the_harness_score_on_the_local_gsm8k_task_equals_opds_own_greedy_evaluation(answering_model):
    directory, model, tokenizer = answering_model
    results = run_harness(directory, ["opd_gsm8k_local"], num_fewshot=0, max_gen_toks=MAX_NEW, batch_size=4,
                          log_samples=True)
    harness = metrics_of(results)
    samples = sorted((s for s in results["samples"]["opd_gsm8k_local"] if s["filter"] == "strict-match"),
                     key=lambda s: s["doc_id"])

    records = [(f"row {i}", {"messages": [{"role": "user", "content": _question(r)}], "answer": _gold(r)})
               for i, r in enumerate(GSM8K_ROWS)]
    prompts, _ = encode_prompts(records, tokenizer, 512)
    sampler = HFSampler(model, tokenizer, SamplingConfig(stop=["Question:"]))
    ours, rollouts = evaluate_prompts(prompts, sampler, EvalConfig(greedy=True), MAX_NEW, default_grader="numeric")
    texts = [completion_text(tokenizer, row, keep) for row, keep in zip(rollouts.tokens, rollouts.completion_mask)]

    # the same greedy completions, row by row ...
    assert [s["resps"][0][0].strip() for s in samples] == [t.replace("</s>", "").strip() for t in texts]
    # ... and the same score: the harness's last-number extraction against opd's numeric grader
    assert harness["lm_eval/opd_gsm8k_local/exact_match_flexible-extract"] == pytest.approx(ours["accuracy"])
    assert harness["lm_eval/opd_gsm8k_local/exact_match_strict-match"] == pytest.approx(ours["accuracy"])
    assert 0.25 <= ours["accuracy"] <= 0.75  # the model learnt the rows: right on half of them


def test_the_shipped_math_and_ifeval_tasks_run_offline(answering_model):
    directory, _, _ = answering_model
    results = run_harness(directory, ["opd_math500_local", "opd_ifeval_local"], limit=3, max_gen_toks=8)
    metrics = metrics_of(results)
    assert {"lm_eval/opd_math500_local/math_verify", "lm_eval/opd_math500_local/exact_match",
            "lm_eval/opd_ifeval_local/prompt_level_strict_acc",
            "lm_eval/opd_ifeval_local/inst_level_loose_acc"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_nltk_finds_punkt_without_a_download(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    root = offline_punkt(tmp_path / "nltk_data")
    assert root == tmp_path / "nltk_data" and nltk.data.path[0] == str(root)
    # Punkt's abbreviation table keeps "Dr." inside a sentence
    assert nltk.sent_tokenize("Dr. Smith arrived at noon. He left soon after.") == [
        "Dr. Smith arrived at noon.", "He left soon after."]


def test_without_the_extra_lm_eval_is_one_line_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "no-such-model"), "--lm-eval", "opd_gsm8k_local"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'opd[eval]'" in lines[0], result.output


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_in_training_lm_eval_is_logged_at_its_steps_and_survives_resume(tmp_path):
    from helpers import TINY_RUN
    from opd.config import load_config
    from opd.loop import train

    settings = [*TINY_RUN, "train.steps=4", "eval.max_new_tokens=6", "log.tensorboard=true",
                "eval.lm_eval={tasks: [opd_gsm8k_local], every: 3, limit: 2, num_fewshot: 0}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(None, [f"run_dir={straight}", *settings]))
    train(load_config(None, [f"run_dir={split}", *settings]), stop_after=2)
    train(load_config(None, [f"run_dir={split}", *settings]), resume=True)

    key = "lm_eval/opd_gsm8k_local/exact_match_strict-match"
    for run_dir in (straight, split):
        assert [r["step"] for r in _rows(run_dir) if key in r] == [0, 3, 4]  # the start, every 3, the end
    benchmarks = [{k: v for k, v in r.items() if k.startswith("lm_eval/")} for r in _rows(straight)]
    assert benchmarks == [{k: v for k, v in r.items() if k.startswith("lm_eval/")} for r in _rows(split)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight)).Reload()
    assert [e.step for e in events.Scalars(key)] == [0, 3, 4]

    # drawn by opd report, compared by opd compare
    from opd.compare import method_row
    from opd.report import build_report

    page = build_report(split).read_text()
    assert "lm_eval_vs_step.png" in page and key in page and (split / "lm_eval_vs_step.png").is_file()
    row = method_row("distill", [straight, split], target=None)
    assert row["lm_eval"]["opd_gsm8k_local/exact_match_strict-match"] == benchmarks[-1][key]


def test_a_run_with_lm_eval_but_no_harness_fails_before_loading_models(monkeypatch, tmp_path):
    from helpers import TINY_RUN
    from opd.config import load_config
    from opd.loop import train

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *TINY_RUN, "eval.lm_eval={tasks: [opd_gsm8k_local]}"])
    with pytest.raises(ImportError, match=r"pip install 'opd\[eval\]'"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_opd_eval_lm_eval_on_a_lora_run_writes_the_harness_json_into_the_run(tmp_path):
    import shutil

    from helpers import TINY_RUN
    from opd.config import load_config
    from opd.loop import train

    run_dir = tmp_path / "run"
    train(load_config(None, [f"run_dir={run_dir}", *TINY_RUN, "train.steps=1", "student.lora.rank=2"]))
    # a task of the user's own: a copy of the shipped one under a new name, in a folder of its own
    mine = tmp_path / "my_tasks"
    mine.mkdir()
    shutil.copy(TASK_DIR / "utils.py", mine / "utils.py")
    yaml_text = (TASK_DIR / "gsm8k_local.yaml").read_text().replace("task: opd_gsm8k_local", "task: my_gsm8k")
    data = TASK_DIR / "data"
    yaml_text = yaml_text.replace("data/gsm8k_format", f"{data}/gsm8k_format")  # absolute paths
    (mine / "my_gsm8k.yaml").write_text(yaml_text)

    result = CliRunner().invoke(app, ["eval", str(run_dir), "eval.max_new_tokens=4", "--lm-eval",
                                      "opd_gsm8k_local,my_gsm8k", "--limit", "2", "--tasks-dir", str(mine)])
    assert result.exit_code == 0, result.output
    assert "opd_gsm8k_local" in result.output and "my_gsm8k" in result.output and "exact_match" in result.output
    written = json.loads((run_dir / "lm_eval" / "step_000001.json").read_text())
    assert written["checkpoint"] == str(run_dir / "checkpoints" / "step_000001")
    assert written["metrics"]["lm_eval/my_gsm8k/exact_match_strict-match"] == \
        written["metrics"]["lm_eval/opd_gsm8k_local/exact_match_strict-match"]
    assert written["harness"]["results"]["opd_gsm8k_local"]

