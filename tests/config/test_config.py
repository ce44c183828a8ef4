import pytest

from opd.config import ConfigError, load_config, parse_override

BASE = ["student.tiny.hidden_size=32", "teacher.tiny.hidden_size=64"]


def test_overrides_are_typed():
    cfg = load_config(None, BASE + ["optim.lr=3e-4", 'sampling.stop=["\\n", "###"]', "student.lora.rank=4",
                                    "optim.grad_clip=null"])
    assert cfg.optim.lr == 3e-4 and cfg.sampling.stop == ["\n", "###"]
    assert cfg.student.lora.rank == 4 and cfg.student.lora.alpha == 32.0
    assert cfg.optim.grad_clip is None


def test_yaml_file_and_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("student:\n  tiny: {hidden_size: 16}\nteacher:\n  path: /models/t\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["optim.warmup_steps=0", "student.tiny.seed=3"])
    assert cfg.student.tiny.hidden_size == 16 and cfg.student.tiny.seed == 3
    assert cfg.optim.lr == 0.01 and cfg.optim.warmup_steps == 0 and cfg.teacher.path == "/models/t"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key \(did you mean 'optim\.lr'\?\)"):
        load_config(None, BASE + ["optim.lrr=1e-3"])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"sampling\.samples_per_prompt: .*greater than or equal to 1.*got 0"):
        load_config(None, BASE + ["sampling.samples_per_prompt=0"])
    with pytest.raises(ConfigError, match=r"loss\.kind: Input should be 'sampled_reverse_kl'"):
        load_config(None, BASE + ["loss.kind=kl"])


def test_model_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="method=distill needs a `teacher`"):
        load_config(None, ["student.tiny.hidden_size=32"])
    with pytest.raises(ConfigError, match="teacher: .*exactly one of `path`"):
        load_config(None, ["student.tiny.hidden_size=32", "teacher.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="teacher: .*exactly one of `path`"):
        load_config(None, ["student.tiny.hidden_size=32", "teacher.path=/m", "teacher.tiny.seed=1"])
    with pytest.raises(ConfigError, match="teacher.lora: the teacher is fixed"):
        load_config(None, BASE + ["teacher.lora.rank=4"])


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("optim..lr=1")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_example_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "example.yaml")
    assert cfg.student.lora.rank == 32 and cfg.loss.kind == "sampled_reverse_kl"


def test_every_shipped_config_is_valid():
    from pathlib import Path

    import yaml

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        if "phases" in (yaml.safe_load(path.read_text()) or {}):  # an `opd pipeline` file: every phase checked
            from opd.pipeline import check_pipeline, read_pipeline

            check_pipeline(read_pipeline(path), Path("runs/check"), ["base:student.path=models/base"]
                           if "pipeline_personalize" in path.name else [])
            continue
        load_config(path)  # raises ConfigError naming the key otherwise
