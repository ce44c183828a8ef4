import json

import pytest

from opd.data import PromptDataError, PromptSchedule, encode_prompts, read_records
from opd.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_messages_and_prompt_records(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "Hi"}], "answer": "4"},
                                              "", {"prompt": "The river is"}])
    prompts, skipped = encode_prompts(read_records(path), tok, max_tokens=64)
    assert skipped == 0 and len(prompts) == 2
    assert prompts[0].text == "<|user|>Hi<|assistant|>" and prompts[0].record["answer"] == "4"
    assert prompts[1].text == "The river is"


def test_malformed_line_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c"'])
    with pytest.raises(PromptDataError, match=r"bad\.jsonl:3: not valid JSON"):
        read_records(path)


def test_record_without_prompt_names_line_and_keys(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(PromptDataError, match=r"p\.jsonl:2: a record needs .*found keys: \['question'\]"):
        encode_prompts(read_records(path), tok, 64)
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a"}, {"prompt": ""}])
    with pytest.raises(PromptDataError, match=r"e\.jsonl:2: the prompt is empty"):
        encode_prompts(read_records(path), tok, 64)
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(PromptDataError, match=r"m\.jsonl:1: messages\[0\] must be an object with string"):
        encode_prompts(read_records(path), tok, 64)


def test_overlong_prompts_are_skipped_with_a_count_or_truncated(tmp_path, tok):
    long = "word " * 50
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "short"}, {"prompt": long}, {"prompt": long}])
    prompts, skipped = encode_prompts(read_records(path), tok, max_tokens=10, overlong="skip")
    assert len(prompts) == 1 and skipped == 2
    prompts, skipped = encode_prompts(read_records(path), tok, max_tokens=10, overlong="truncate")
    assert skipped == 0 and [len(p.ids) for p in prompts][1:] == [10, 10]
    assert prompts[1].ids == tok(long).input_ids[-10:]  # the end of the prompt is kept


def test_parquet_and_json_array(tmp_path, tok):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "a b"}, {"prompt": "c"}]).to_parquet(str(tmp_path / "p.parquet"))
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "x"}]))
    assert [r["prompt"] for _, r in read_records(tmp_path / "p.parquet")] == ["a b", "c"]
    assert read_records(tmp_path / "p.json") == [(f"{tmp_path / 'p.json'}[0]", {"prompt": "x"})]


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(PromptDataError, match="prompt file not found"):
        read_records(tmp_path / "none.jsonl")
    (tmp_path / "p.xml").write_text("<a/>")
    with pytest.raises(PromptDataError, match="unsupported prompt file type '.xml'"):
        read_records(tmp_path / "p.xml")


def test_schedule_is_a_function_of_the_step():
    s = PromptSchedule(10, 4, seed=0)
    batches = [s.indices(i) for i in range(5)]
    assert sorted(batches[0] + batches[1] + batches[2][:2]) == list(range(10))  # each epoch covers all prompts
    assert PromptSchedule(10, 4, seed=0).indices(3) == batches[3]
    assert PromptSchedule(10, 4, seed=1).indices(0) != batches[0]
