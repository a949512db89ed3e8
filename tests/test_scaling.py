"""The compute study's measure: power-law fits, iso-loss ratios and their jackknife, bits per byte over a whole
held-out split, and the study's analysis on runs whose answer is planted."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from helpers import tiny_config
from nanoseek.data.tokenizer import END_OF_TEXT, token_byte_lengths, train_tokenizer
from nanoseek.models.registry import build_model
from nanoseek.train.heldout import held_out_loss
from studies.scaling import (
    PowerLaw,
    fit_power_law,
    fit_power_laws,
    fits_without_each_budget,
    iso_loss_ratio,
    jackknife_error,
)

BUDGETS = [1e12, 2e12, 4e12, 8e12, 16e12]


def test_the_fit_recovers_a_planted_curve_and_inverts_it():
    planted = PowerLaw(a=1.7, b=0.35, c=1.2, scale=4e12)
    fit = fit_power_law(BUDGETS, planted.loss(np.array(BUDGETS)))
    assert fit.b == pytest.approx(planted.b, rel=2e-3)
    assert fit.c == pytest.approx(planted.c, rel=2e-3)
    for flops in (1.5e12, 9e12, 3e13):  # the same curve, between and beyond the points
        assert fit.loss(flops) == pytest.approx(planted.loss(flops), rel=1e-4)
        assert fit.flops_at(float(fit.loss(flops))) == pytest.approx(flops, rel=1e-6)
    assert fit.flops_at(fit.c) == math.inf  # the floor is never reached


def test_the_iso_loss_ratio_is_the_planted_compute_multiplier():
    """An arm whose loss at C equals the reference's at 2.5·C needs 2.5x fewer FLOPs at every loss."""
    reference = PowerLaw(a=2.0, b=0.3, c=1.5, scale=1e12)
    flops = np.array(BUDGETS)
    fitted_reference = fit_power_law(flops, reference.loss(flops))
    fitted_other = fit_power_law(flops, reference.loss(2.5 * flops))
    for target in (3.0, 2.6, 2.4):
        assert iso_loss_ratio(fitted_reference, fitted_other, target) == pytest.approx(2.5, rel=2e-3)


def test_the_fit_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match=">= 3 distinct budgets"):
        fit_power_law([1e12, 1e12, 2e12], [3.0, 3.1, 2.9])
    with pytest.raises(ValueError, match="does not fall"):
        fit_power_law([1e12, 2e12, 4e12], [3.0, 3.2, 3.4])
    with pytest.raises(ValueError, match="finite"):
        fit_power_law([1e12, 2e12, 4e12], [3.0, math.nan, 2.5])


def test_curves_of_one_study_share_their_floor():
    """Two arms on one corpus: a joint fit finds the planted common floor and each arm's own a and b."""
    flops = np.array(BUDGETS)
    first, second = PowerLaw(a=1.0, b=0.25, c=1.3, scale=4e12), PowerLaw(a=0.8, b=0.3, c=1.3, scale=4e12)
    fits = fit_power_laws({"first": (flops, first.loss(flops)), "second": (flops, second.loss(flops))})
    assert fits["first"].c == fits["second"].c == pytest.approx(1.3, rel=2e-3)
    assert (fits["first"].b, fits["second"].b) == (pytest.approx(0.25, rel=5e-3), pytest.approx(0.3, rel=5e-3))


def test_the_jackknife_leaves_out_a_budget_with_all_its_seeds():
    assert jackknife_error([1.0, 2.0, 3.0]) == pytest.approx(math.sqrt(2 / 3 * 2))
    assert math.isnan(jackknife_error([1.0, math.inf]))
    planted = PowerLaw(a=1.0, b=0.4, c=2.0, scale=1e12)
    flops = [*BUDGETS, BUDGETS[2]]  # a second seed at the middle budget
    budgets = [0.25, 0.5, 1.0, 2.0, 4.0, 1.0]
    exact = list(planted.loss(np.array(flops)))
    folds = fits_without_each_budget({"arm": (flops, exact, budgets)})
    assert sorted(folds) == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert all(f is not None and f["arm"].b == pytest.approx(0.4, rel=5e-3) for f in folds.values())
    noisy = [loss + noise for loss, noise in zip(exact, [0.02, -0.015, 0.01, 0.0, -0.02, -0.01])]
    refits = fits_without_each_budget({"arm": (flops, noisy, budgets)}).values()
    assert jackknife_error([f["arm"].flops_at(2.5) for f in refits]) > 0
    three = fits_without_each_budget({"arm": (flops[:3], exact[:3], budgets[:3])})  # two budgets left: no fit
    assert list(three.values()) == [None, None, None]


def test_token_byte_lengths_count_the_text_each_token_stands_for():
    tokenizer = train_tokenizer(["héllo wörld 日本語 the cat 🙂 sat on the mat\n"] * 20, 320)
    lengths = token_byte_lengths(tokenizer)
    for text in ("héllo 日本語, the 🙂 mat\n", "unseen: ЖЖЖ ðŋ"):
        assert lengths[tokenizer.encode(text).ids].sum() == len(text.encode())
    assert lengths[tokenizer.token_to_id(END_OF_TEXT)] == 0


class _Split:
    """A held-out split as held_out_loss reads it: a length and token windows."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start : start + length].astype(np.int64)


def test_held_out_loss_predicts_every_token_once():
    torch.manual_seed(0)
    model = build_model(tiny_config(num_nextn_predict_layers=0))
    tokens = np.random.default_rng(0).integers(0, 96, size=16 * 5 + 7)  # 5 full windows of 16, and a short one
    byte_lengths = np.arange(96) % 4  # some tokens stand for no bytes, as special tokens do
    result = held_out_loss(model, _Split(tokens), byte_lengths, seq_len=16, batch_size=2)
    assert result.tokens == len(tokens) - 1
    assert result.bytes == byte_lengths[tokens[1:]].sum()
    expected = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 16):
            window = torch.from_numpy(tokens[start : start + 17]).long()[None]
            out = model(window[:, :-1], window[:, 1:], with_mtp=False)
            expected += out.lm_loss.item() * (window.shape[1] - 1)
    assert result.nats == pytest.approx(expected, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / result.bytes, rel=1e-5)
    first = held_out_loss(model, _Split(tokens), byte_lengths, seq_len=16, batch_size=2, max_windows=2)
    assert first.tokens == 32 and first.bytes == byte_lengths[tokens[1:33]].sum()


def test_the_study_reads_planted_gains_and_writes_its_report(tmp_path):
    """Runs whose bits per byte follow one curve at a planted compute multiplier per arm: the analysis recovers
    each multiplier as the iso-loss ratio, and the report holds every run and every arm."""
    from nanoseek.flops import model_stats
    from studies.dense_vs_deepseek import BUDGETS as STUDY_BUDGETS
    from studies.dense_vs_deepseek import SEEDS, arms
    from studies.study_report import analyse, write_report

    planted = PowerLaw(a=2.0, b=0.3, c=1.5, scale=1e13)
    gains = dict(zip([arm.name for arm in arms()], (1.0, 1.4, 1.8, 2.2, 2.6, 3.0)))
    noise = np.random.default_rng(0)
    results = []
    for arm in arms():
        stats = model_stats(arm.model, seq_len=128)
        per_token = stats.flops_per_token + (stats.mtp_flops_per_token if arm.use_mtp else 0.0)
        for budget in STUDY_BUDGETS:
            for seed in SEEDS if budget in arm.repeated_budgets else SEEDS[:1]:
                steps = round(100 * budget)
                flops = steps * 2048 * per_token
                results.append(
                    dict(
                        arm=arm.name,
                        budget=budget,
                        seed=seed,
                        steps=steps,
                        tokens=steps * 2048,
                        flops_per_token=per_token,
                        train_flops=flops,
                        wall_s=steps * 0.3,
                        tokens_per_s=6800.0,
                        sampled_val_loss=2.0,
                        held_out_nats_per_token=2.0,
                        held_out_tokens=1000,
                        held_out_bytes=3000,
                        bpb=float(planted.loss(flops * gains[arm.name])) + noise.normal(0, 1e-4),
                    )
                )
    summary = analyse(results, {arm.name: (arm.model, arm.use_mtp) for arm in arms()}, 100, 128)
    for name, gain in gains.items():
        assert summary["arms"][name]["iso_loss_ratio"] == pytest.approx(gain, rel=0.02)
        assert summary["arms"][name]["iso_loss_ratio_jackknife_se"] < 0.05 * gain
        assert all(v == pytest.approx(gain, rel=0.03) for v in summary["arms"][name]["iso_loss_ratio_by_seed"].values())
    assert summary["arms"]["moe-64"]["seeds"]["1x"]["spread"] < 1e-3
    write_report(results, summary, {"dense": {"note": "configs go here"}}, tmp_path)
    with (tmp_path / "sparsity_sweep.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(results)
    report = json.loads((tmp_path / "sparsity_sweep.json").read_text())
    assert set(report["arms"]) == set(gains) and report["configs"]["dense"] == {"note": "configs go here"}
    assert (tmp_path / "sparsity_sweep.png").stat().st_size > 0 and (tmp_path / "iso_loss_ratio.png").stat().st_size > 0


def test_round_two_reads_planted_multipliers_their_trend_and_the_sparsity_law(tmp_path):
    """Runs planted on one curve, each arm at a multiplier m(C) = g·(E/k)^0.2·(C/C₀)^r: the analysis gives m at
    every budget, a trend that rises beyond its error only where r > 0, and the law's exponent of E/k."""
    from nanoseek.flops import model_stats
    from studies.study2 import SCALES, arms, schedule
    from studies.study2_markdown import section
    from studies.study2_report import analyse_round2, write_round2

    planted = PowerLaw(a=2.0, b=0.3, c=1.5, scale=1e13)
    rising = {"moe-16": 0.0, "moe-64": 0.0, "moe-256": 0.0, "moe-128-w0.5": 0.15}
    picked = {arm.name: arm for arm in arms(SCALES["cpu"]) if arm.name in ("dense", *rising)}

    def multiplier(name: str, flops: float) -> float:
        if name == "dense":
            return 1.0
        model = picked[name].model
        return 1.1 * (model.n_routed_experts / model.num_experts_per_tok) ** 0.2 * (flops / 1e13) ** rising[name]

    noise = np.random.default_rng(0)
    results = []
    for name, arm in picked.items():
        per_token = model_stats(arm.model, seq_len=128).flops_per_token
        for budget, seed in schedule(arm, SCALES["cpu"]):
            steps = round(100 * budget)
            flops = steps * 2048 * per_token
            results.append(
                dict(
                    arm=name,
                    budget=budget,
                    seed=seed,
                    steps=steps,
                    tokens=steps * 2048,
                    flops_per_token=per_token,
                    train_flops=flops,
                    wall_s=steps * 0.3,
                    tokens_per_s=6800.0,
                    sampled_val_loss=2.0,
                    held_out_nats_per_token=2.0,
                    held_out_tokens=1000,
                    held_out_bytes=3000,
                    bpb=float(planted.loss(flops * multiplier(name, flops))) + noise.normal(0, 1e-5),
                )
            )
    groups = {"sparsity": ["moe-16", "moe-64", "moe-256"], "granularity": ["moe-64", "moe-128-w0.5"]}
    summary = analyse_round2(
        results, {name: arm.model for name, arm in picked.items()}, 100, 128, groups, train_tokens=10**6
    )
    for name in rising:
        a = summary["arms"][name]
        for point in a["multiplier_by_budget"].values():
            assert point["multiplier"] == pytest.approx(multiplier(name, point["flops"]), rel=0.03)
        assert a["multiplier_trend"]["slope"] == pytest.approx(rising[name], abs=0.02)
        assert a["multiplier_trend"]["rises_beyond_error"] == (rising[name] > 0)
        assert 0.3 < a["routed_flop_share"] < 1
    assert summary["arms"]["dense"]["routed_flop_share"] == 0
    assert summary["sparsity_law"]["beta"]["value"] == pytest.approx(0.2, abs=0.05)
    assert summary["sparsity_law"]["beta"]["se"] < 0.05
    write_round2(results, summary, {"dense": {}}, tmp_path)
    assert (tmp_path / "multiplier_vs_compute.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "best arm there is moe-256" in report and "for the best arm: met" in report
    assert "rises with compute beyond its error: met by moe-128-w0.5." in report
    linked = section(summary, results, "docs/study2")  # the images named relative to where the text is read
    assert "(docs/study2/multiplier_vs_compute.png)" in linked and report.endswith(linked.replace("docs/study2", "."))
    assert json.loads((tmp_path / "sparsity_sweep.json").read_text())["arms"]["moe-64"]["iso_loss_ratio"] > 1


def test_a_study_reuses_the_runs_its_ledger_records_and_names_a_bad_line(tmp_path, monkeypatch):
    """A finished run is a ledger line (a committed file outlives the machine): reused where its configs are the
    run's, carried into the ledger from a run directory's study.json, trained again where the seed differs, and a
    broken line is one clear error."""
    import studies.dense_vs_deepseek as study
    from studies.dense_vs_deepseek import Arm, run, run_configs, train_config

    trained = []
    monkeypatch.setattr(study, "train", lambda spec, **_: trained.append(spec.train.seed) or 1 / 0)
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer(["To be, or not to be, that is the question. " * 20], 300).save(str(tokenizer))
    arm, ledger = Arm("dense", tiny_config()), tmp_path / "docs" / "runs.jsonl"
    cfg = train_config(8, 1337, tokenizer, use_mtp=False)
    recorded = {"arm": "dense", "budget": 1.0, "seed": 1337, "bpb": 2.5, "configs": run_configs(arm, cfg)}
    ledger.parent.mkdir()
    ledger.write_text(json.dumps(recorded) + "\n\n")
    assert run(tmp_path / "runs", arm, 1.0, cfg, ledger=ledger) == recorded and trained == []
    with pytest.raises(ZeroDivisionError):
        run(tmp_path / "runs", arm, 1.0, train_config(8, 7, tokenizer, use_mtp=False), ledger=ledger)
    assert trained == [7]
    measured = {**recorded, "seed": 7, "configs": run_configs(arm, train_config(8, 7, tokenizer, use_mtp=False))}
    (tmp_path / "runs" / "dense-1x-seed7").mkdir(parents=True)
    (tmp_path / "runs" / "dense-1x-seed7" / "study.json").write_text(json.dumps(measured))
    assert run(tmp_path / "runs", arm, 1.0, train_config(8, 7, tokenizer, use_mtp=False), ledger=ledger) == measured
    assert [json.loads(line) for line in ledger.read_text().splitlines() if line] == [recorded, measured]
    assert trained == [7]
    with ledger.open("a") as f:
        f.write('{"arm": "dense", "bu\n')
    with pytest.raises(SystemExit, match=r"runs.jsonl:4 is not a run's JSON .*; mend or delete that line"):
        run(tmp_path / "runs", arm, 1.0, cfg, ledger=ledger)
