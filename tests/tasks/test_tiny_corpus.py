"""tiny.tokenizer_corpus: the tiny tokenizer learns the user's own words too."""

from opd.config import load_config
from opd.compare import config_key
from opd.models import load_tokenizer
from opd.tiny import build_tiny_tokenizer


def test_a_word_of_the_corpus_takes_fewer_tokens_with_the_corpus(tmp_path):
    corpus = tmp_path / "task.jsonl"
    corpus.write_text("".join(f'{{"prompt": "Sort q v k x: Answer", "answer": "Quorblex {i} k q v x"}}\n'
                              for i in range(300)))
    plain, own = build_tiny_tokenizer(), build_tiny_tokenizer(corpus_files=(str(corpus),))
    for word in (" Quorblex", " Answer"):
        assert len(own.encode(word, add_special_tokens=False)) < len(plain.encode(word, add_special_tokens=False))
    assert len(own) == len(plain)  # same vocabulary size, other merges

    # from a run config: student and teacher built with it; the cache key follows the corpus
    cfg = load_config(None, ["method=sft", "student.tiny.hidden_size=32", f"student.tiny.tokenizer_corpus=[{corpus}]"])
    assert load_tokenizer(cfg.student).encode(" Quorblex", add_special_tokens=False) == \
        own.encode(" Quorblex", add_special_tokens=False)
    assert config_key(cfg) != config_key(load_config(None, ["method=sft", "student.tiny.hidden_size=32"]))
