"""Paired significance and the verdicts on the paper's claims, on results built by hand."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from fedcollm.experiments.claims import (
    communication_verdict,
    gain_verdict,
    llm_verdict,
    significance_section,
)
from fedcollm.experiments.significance import POWER_80, compare_methods


def _predictions(correct: list[float]) -> dict:
    return {
        "id": [f"q{i}" for i in range(len(correct))],
        "answer": [0] * len(correct),
        "acc": correct,
    }


def _scores(correct: list[float]) -> dict:
    p = statistics.fmean(correct)
    return {"acc": p, "acc_stderr": math.sqrt(p * (1 - p) / (len(correct) - 1)), "n": len(correct)}


def _result(method, seed, *, llm=None, clients=None, global_slm=None, predictions=True):
    result = {
        "task": "arc_easy",
        "metrics": ["acc", "acc_norm"],
        "method": method,
        "seed": seed,
        "llm": llm and _scores(llm),
        "slm_global": global_slm and _scores(global_slm),
        "slm_clients": clients and [_scores(c) for c in clients],
    }
    if predictions:
        result["predictions"] = {
            "llm": llm and _predictions(llm),
            "slm_global": global_slm and _predictions(global_slm),
            "slm_clients": clients and [_predictions(c) for c in clients],
        }
    return result


def _answers(n: int, accuracy: float, rng: random.Random) -> list[float]:
    return [float(rng.random() < accuracy) for _ in range(n)]


def _flip(answers: list[float], share: float, rng: random.Random) -> list[float]:
    """The same answers with a share of the wrong ones made right."""
    return [1.0 if a == 0 and rng.random() < share else a for a in answers]


def _experiment(gain: float, n: int = 600, seeds: int = 3, predictions: bool = True):
    """Standalone and FedCoLLM clients on the same questions; FedCoLLM's get `gain` of the
    questions Standalone's miss right, and nothing else changes."""
    rng = random.Random(0)
    results = []
    for seed in range(seeds):
        base = [_answers(n, 0.5, rng) for _ in range(2)]
        ours = [_flip(b, gain, rng) for b in base]
        results += [
            _result("standalone", seed, clients=base, predictions=predictions),
            _result("fedcollm", seed, clients=ours, predictions=predictions),
        ]
    return results


def test_a_real_gain_is_confirmed_and_no_gain_is_not():
    real = compare_methods(
        _experiment(0.2), "arc_easy", "slm_clients", "fedcollm", "standalone", "acc"
    )
    assert real.paired and real.questions == 600 and real.seeds == [0, 1, 2]
    assert real.diff == pytest.approx(0.1, abs=0.02)  # 20% of the half they missed
    assert real.diff_ci[0] > 0
    assert gain_verdict(real).startswith("- **Clients' SLMs gain over Standalone**: confirmed")
    # McNemar per seed: FedCoLLM's clients only ever win, so the exact test is tiny.
    assert all(losses == 0 and p < 1e-6 for _, _, losses, p in real.mcnemar)

    none = compare_methods(
        _experiment(0.0), "arc_easy", "slm_clients", "fedcollm", "standalone", "acc"
    )
    assert none.diff == 0 and none.diff_ci == (0.0, 0.0)
    assert "not resolved at this power" in gain_verdict(none)

    worse = compare_methods(
        list(reversed(_experiment(0.2))), "arc_easy", "slm_clients", "standalone", "fedcollm", "acc"
    )
    assert worse.diff_ci[1] < 0 and "contradicted" in gain_verdict(worse)


def test_bootstrap_interval_and_detectable_difference_match_the_paired_standard_error():
    # Unrelated answers of two models under one seed: the difference's standard error is
    # that of a paired mean over questions, which the bootstrap must reproduce. (Under several
    # seeds it also resamples them, and is wider than this: it counts the seeds' spread too.)
    rng = random.Random(1)
    n, seeds = 800, 1
    results = []
    for seed in range(seeds):
        results += [
            _result("zero-shot", seed, llm=_answers(n, 0.5, rng)),
            _result("fedcollm", seed, llm=_answers(n, 0.5, rng)),
        ]
    c = compare_methods(results, "arc_easy", "llm", "fedcollm", "zero-shot", "acc")
    d = [
        a - b
        for s in range(seeds)
        for a, b in zip(
            results[2 * s + 1]["predictions"]["llm"]["acc"],
            results[2 * s]["predictions"]["llm"]["acc"],
            strict=True,
        )
    ]
    analytic = statistics.stdev(d) / math.sqrt(len(d))
    assert c.se == pytest.approx(analytic, rel=0.15)
    assert c.detectable == pytest.approx(POWER_80 * c.se)
    low, high = c.diff_ci
    assert high - low == pytest.approx(2 * 1.96 * c.se, rel=0.1)
    # McNemar's exact test, from the counts it reports.
    seed, wins, losses, p = c.mcnemar[0]
    assert seed == 0 and wins + losses > 0
    from scipy.stats import binomtest

    assert p == pytest.approx(binomtest(wins, wins + losses, 0.5).pvalue)


def test_only_questions_both_answered_are_paired():
    rng = random.Random(2)
    ours, theirs = _answers(50, 0.6, rng), _answers(60, 0.4, rng)
    results = [_result("centralized", 0, llm=theirs), _result("fedcollm", 0, llm=ours)]
    c = compare_methods(results, "arc_easy", "llm", "fedcollm", "centralized", "acc")
    assert c.questions == 50
    assert c.baseline_mean == pytest.approx(statistics.fmean(theirs[:50]))


def test_the_llm_verdict_reads_the_ratio_against_97_percent():
    rng = random.Random(3)
    same = _answers(2000, 0.6, rng)
    equal = [_result("centralized", 0, llm=same), _result("fedcollm", 0, llm=same)]
    c = compare_methods(equal, "arc_easy", "llm", "fedcollm", "centralized", "acc")
    assert c.ratio == 1 and c.ratio_ci == (1.0, 1.0)
    assert "97-99% of Centralized**: confirmed" in llm_verdict(c)
    # Half the right answers lost: 50% of Centralized, well under 97%.
    halved = [a if i % 2 else 0.0 for i, a in enumerate(same)]
    worse = [_result("centralized", 0, llm=same), _result("fedcollm", 0, llm=halved)]
    c = compare_methods(worse, "arc_easy", "llm", "fedcollm", "centralized", "acc")
    assert c.ratio_ci[1] < 0.97 and "contradicted" in llm_verdict(c)
    assert "not tested" in llm_verdict(None)


def test_results_without_predictions_are_compared_unpaired():
    c = compare_methods(
        _experiment(0.2, n=100, predictions=False),
        "arc_easy",
        "slm_clients",
        "fedcollm",
        "standalone",
        "acc",
    )
    assert not c.paired and c.mcnemar == [] and c.questions == 100
    paired = compare_methods(
        _experiment(0.2, n=100), "arc_easy", "slm_clients", "fedcollm", "standalone", "acc"
    )
    assert c.diff == pytest.approx(paired.diff)
    assert c.se > paired.se  # pairing removes the questions' shared difficulty


def test_communication_verdict_from_what_travelled():
    history = [
        {
            "round": 1,
            "adapter_params": 1000,
            "slm_params": 1_000_000,
            "clients": [{"bytes_sent": 4100, "wire_bytes_sent": 4200}],
        }
    ]
    gpt2 = {"slm": {"name": "gpt2"}}  # the paper's SLM
    run = {"method": "fedcollm", "history": history, "config": gpt2}
    verdict = communication_verdict([run])
    assert "confirmed" in verdict and "0.105%" in verdict  # 4200 of 4e6 bytes
    history[0]["clients"][0]["wire_bytes_sent"] = 40_000  # ten times the adapter: not theta alone
    assert "contradicted" in communication_verdict([run])
    assert "not tested" in communication_verdict([])
    # Another SLM's share says nothing for or against the paper's 0.24%.
    other = communication_verdict([{**run, "config": {"slm": {"name": "smollm2-135m"}}}])
    assert "not comparable (the paper's SLMs are GPT-2 Small and OPT-1.3B; this run's is " in other
    assert "smollm2-135m)" in other and "contradicted" not in other


def test_the_section_plots_every_comparison(tmp_path):
    results = _experiment(0.2, n=200)
    text = significance_section(results, tmp_path)
    assert "| clients' SLMs: FedCoLLM - Standalone | acc | 3 x 200 |" in text
    assert (tmp_path / "significance_arc_easy.png").stat().st_size > 10_000
    assert "not tested (needs the centralized and fedcollm methods)" in text


def test_one_zero_shot_run_stands_for_every_seed():
    rng = random.Random(4)
    untrained = _answers(300, 0.4, rng)
    results = [_result("zero-shot", 0, llm=untrained)]
    results += [_result("fedcollm", s, llm=_flip(untrained, 0.3, rng)) for s in range(3)]
    c = compare_methods(results, "arc_easy", "llm", "fedcollm", "zero-shot", "acc")
    assert c.seeds == [0, 1, 2] and len(c.mcnemar) == 3
    assert all(losses == 0 for _, _, losses, _ in c.mcnemar)
    # A trained baseline is not stretched over seeds it did not run.
    results.append(_result("centralized", 0, llm=untrained))
    assert compare_methods(results, "arc_easy", "llm", "fedcollm", "centralized", "acc").seeds == [
        0
    ]


def test_the_distilled_global_adapter_is_compared_with_fedavgs_average_and_fedavg_aux(tmp_path):
    rng = random.Random(5)
    results = []
    for seed in range(2):
        average = _answers(200, 0.5, rng)
        results += [
            _result("fedavg", seed, global_slm=average),
            _result("fedcollm", seed, global_slm=_flip(average, 0.3, rng), llm=average),
        ]
    text = significance_section(results, tmp_path)
    (row,) = [line for line in text.splitlines() if "global SLM: FedCoLLM - FedAvg |" in line]
    assert "| acc | 2 x 200 |" in row
    assert "FedAvg + D_a" not in text  # no fedavg-aux run: no row
    c = compare_methods(results, "arc_easy", "slm_global", "fedcollm", "fedavg", "acc")
    assert c.paired and c.diff_ci[0] > 0
    # FedAvg + D_a (the same D_a steps without the KL) isolates the distillation, for the
    # adapter the server broadcasts and for the LLM; one seed of it pairs on that seed.
    results.append(_result("fedavg-aux", 0, global_slm=average, llm=_flip(average, 0.3, rng)))
    lines = significance_section(results, tmp_path).splitlines()
    for name in ("global SLM: FedCoLLM - FedAvg + D_a", "LLM: FedCoLLM - FedAvg + D_a"):
        (row,) = [line for line in lines if name in line]
        assert "| acc | 1 x 200 |" in row


def test_questions_that_share_an_id_pair_by_position_not_as_one():
    # A task file whose 20 validation rows all carry the id "x": the baseline gets all 20
    # right, FedCoLLM 18. Keyed by id alone they were one question, and -100 points.
    theirs, ours = [1.0] * 20, [1.0] * 18 + [0.0] * 2
    results = [_result("centralized", 0, llm=theirs), _result("fedcollm", 0, llm=ours)]
    for result in results:
        result["predictions"]["llm"]["id"] = ["x"] * 20
    c = compare_methods(results, "arc_easy", "llm", "fedcollm", "centralized", "acc")
    assert c.questions == 20
    assert c.diff == pytest.approx(-0.10)
    assert c.mcnemar == [(0, 0, 2, 0.5)]


def test_the_clients_per_seed_test_counts_questions_not_client_question_pairs():
    # Two clients answer the same 10 questions: FedCoLLM's clients both right on questions
    # 0-3 where Standalone's are both wrong, and the other way round on question 4. Counted
    # per (client, question) that would be 8 against 2 as if independent; per question it
    # is 4 against 1.
    ours = [1.0] * 4 + [0.0] + [1.0] * 5
    theirs = [0.0] * 4 + [1.0] + [1.0] * 5
    results = [
        _result("standalone", 0, clients=[theirs, theirs]),
        _result("fedcollm", 0, clients=[ours, ours]),
    ]
    c = compare_methods(results, "arc_easy", "slm_clients", "fedcollm", "standalone", "acc")
    assert c.mcnemar == [(0, 4, 1, pytest.approx(0.375))]
