"""benchmarks/vs_trl.py's choice of the levers that make up `opd best`."""

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_trl.py"


def _vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _round(**levers):
    """A lever round: opd at 1000 tokens/s and 900 MiB, each lever at (speed, memory) times that."""
    result = {"opd": {"tokens_per_s": 1000.0, "rss_mib": 900.0}}
    result.update({name: {"tokens_per_s": 1000.0 * speed, "rss_mib": 900.0 * memory}
                   for name, (speed, memory) in levers.items()})
    return result


def test_a_lever_is_kept_only_if_it_does_not_lower_tokens_per_s_per_mib():
    vs_trl = _vs_trl()
    # the small pair: vLLM's engine is 9% faster for 2.5x the memory; the bf16 copy is lean;
    # micro-batches cost 14% of the speed for 27% of the memory
    small = _round(**{"vLLM sampler bf16": (1.09, 2.49), "sampler bf16": (1.15, 1.01), "teacher bf16": (1.31, 0.99),
                      "max_staleness 1": (0.99, 1.05), "micro-batch 8": (0.86, 0.73)})
    assert vs_trl.choose_best(small, list(small)[1:]) == ["sampler bf16", "teacher bf16", "micro-batch 8"]
    # a speed lever that is not faster, or a memory lever that costs more speed than it saves memory
    assert vs_trl.choose_best(_round(**{"max_staleness 1": (1.02, 0.9), "micro-batch 8": (0.80, 0.85)}),
                              ["max_staleness 1", "micro-batch 8"]) == []
    # SmolLM2: the engine's memory is a smaller share, its speed a larger gain: it is kept, the faster way to sample
    smollm2 = _round(**{"vLLM sampler bf16": (1.30, 1.21), "sampler bf16": (1.05, 1.0)})
    assert vs_trl.choose_best(smollm2, list(smollm2)[1:]) == ["vLLM sampler bf16"]


def test_each_lever_is_judged_against_its_own_baseline():
    vs_trl = _vs_trl()
    result = _round(**{"teacher bf16": (1.10, 1.0)})
    faster_neighbours = {"teacher bf16": {"tokens_per_s": 1200.0, "rss_mib": 900.0}}  # opd ran faster beside it
    assert vs_trl.choose_best(result, ["teacher bf16"]) == ["teacher bf16"]
    assert vs_trl.choose_best(result, ["teacher bf16"], faster_neighbours) == []


def test_a_lever_is_judged_on_the_phase_it_changes():
    """A run of minutes drifts in every phase: the bf16 teacher's run halved the scoring while its
    sampling and update ran slower, and must still be kept; a lever that overlaps phases is
    judged on the whole step."""
    vs_trl = _vs_trl()

    def run(sample, score, learn, tokens=2000.0):
        return {"tokens_per_s": tokens / (sample + score + learn), "rss_mib": 9000.0,
                "phases": {"sample": sample / tokens, "score": score / tokens, "learn": learn / tokens}}

    result = {"opd": run(17.0, 6.9, 18.3), "teacher bf16": run(18.5, 3.4, 19.9),
              "max_staleness 1": run(18.5, 3.4, 19.9)}
    assert result["teacher bf16"]["tokens_per_s"] / result["opd"]["tokens_per_s"] < 1.03  # the whole step: no gain
    assert abs(vs_trl.judged_speed(result["teacher bf16"], result["opd"], "score") - 42.2 / 38.7) < 1e-9
    assert vs_trl.choose_best(result, ["teacher bf16", "max_staleness 1"]) == ["teacher bf16"]


def test_an_overlapping_lever_is_judged_again_on_top_of_the_others():
    """One-step-off sampling gains what the other phases leave idle: it is run with and without,
    on top of the other kept levers, and dropped when that combination is not faster."""
    vs_trl = _vs_trl()
    kept = ["sampler bf16", "teacher bf16", "max_staleness 1"]

    def runs(with_overlap_tokens_per_s):
        calls = []

        def run(system, levers):
            calls.append(list(levers))
            fast = "max_staleness 1" in levers
            return {"tokens_per_s": with_overlap_tokens_per_s if fast else 1900.0, "rss_mib": 700.0}
        return run, calls

    run, calls = runs(1500.0)  # slower with it, as measured on the small pair
    best, sentence = vs_trl.confirm_overlap(kept, run)
    assert best == ["sampler bf16", "teacher bf16"] and "dropped" in sentence
    assert calls == [kept[:2], kept] * 2  # alternated, two each
    run, _ = runs(2100.0)
    assert vs_trl.confirm_overlap(kept, run)[0] == kept
    assert vs_trl.confirm_overlap(kept[:2], run) == (kept[:2], "")  # nothing to confirm


def test_bf16_levers_are_skipped_on_a_cpu_without_bf16_units():
    vs_trl = _vs_trl()
    levers = list(vs_trl.LEVERS)
    assert vs_trl.runnable_levers(levers, native_bf16=True) == (levers, [])
    kept, skipped = vs_trl.runnable_levers(levers, native_bf16=False)
    assert skipped == ["vLLM sampler bf16", "sampler bf16", "teacher bf16", "learner bf16"]
    assert kept == ["vLLM sampler", "max_staleness 1", "micro-batch 8"]
    assert {"cpu", "flags", "native_bf16"} <= set(vs_trl.MACHINE)


def test_ratios_are_against_trl_at_its_best_and_bf16_runs_only_where_native():
    vs_trl = _vs_trl()
    assert vs_trl.trl_variants(native_bf16=False) == ["TRL fp32"]  # emulated bf16 would be a straw man
    assert vs_trl.trl_variants(native_bf16=True) == ["TRL fp32", "TRL bf16"]
    results = {"TRL fp32": {"tokens_per_s": 900.0, "rss_mib": 800.0},
               "TRL bf16": {"tokens_per_s": 1300.0, "rss_mib": 600.0}}
    best = vs_trl.best_trl(results)
    assert best["variant"] == "TRL bf16" and best["tokens_per_s"] == 1300.0
    results["TRL"] = best
    results["opd best"] = {"tokens_per_s": 2600.0, "rss_mib": 420.0, "s_per_step": 1.0, "kl_first": 0.1,
                           "kl_last": 0.05}
    for name in ("TRL fp32", "TRL bf16", "TRL"):
        results[name].update(s_per_step=1.0, kl_first=0.1, kl_last=0.05)
    _, ratios = vs_trl.pair_section("small", [results], {"float32": 100.0}, {"student": "s", "teacher": "t"}, [], {})
    assert ratios["opd best"] == {"speed": [2.0], "memory": [0.7]}
