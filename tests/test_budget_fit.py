"""Fitting a budget's steps to a wall-clock target: the arithmetic, the probe, and how `vqgen compare` uses it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import budget_fit, compare
from pipelines.budget_fit import StepSeconds, describe_fit, fit_budget, predicted_training_seconds, probe_step_seconds
from pipelines.budgets import Budget, CompareArguments, budget_for
from pipelines.compare import fitted_budget

BUDGET = Budget(tokenizer_preset="tiny", tokenizer_steps=1200, tokenizer_batch=8, disc_start=400, prior_preset="tiny",
                prior_steps=1000, prior_batch=8, num_eval_samples=40, guidance_scale=2.0, train_minutes=10)
SECONDS = StepSeconds(vqvae=0.1, vqgan=0.2, prior=0.05)  # 1200 * 0.3 + 2 * 1000 * 0.05 = 460 s before overhead


def test_the_prediction_prices_both_tokenizers_and_both_priors():
    assert predicted_training_seconds(BUDGET, SECONDS, overhead=1.0) == pytest.approx(460.0)
    assert predicted_training_seconds(BUDGET, SECONDS, overhead=1.5) == pytest.approx(690.0)


def test_a_budget_that_fits_is_kept_as_it_is():
    fitted, info = fit_budget(BUDGET, SECONDS, overhead=1.0)  # 7.7 min predicted for 10
    assert fitted == BUDGET and info["scale"] == 1.0
    assert info["predicted_minutes"] == pytest.approx(460 / 60)
    assert describe_fit(BUDGET, fitted, info).startswith("fits: 8 min predicted for a target of 10 min")


def test_a_slow_machine_gets_both_stages_scaled_by_one_factor():
    slow = dataclasses.replace(BUDGET, train_minutes=460 / 60 / 2)  # half the predicted time
    fitted, info = fit_budget(slow, SECONDS, overhead=1.0)
    assert info["scale"] == pytest.approx(0.5)
    assert (fitted.tokenizer_steps, fitted.prior_steps, fitted.disc_start) == (600, 500, 200)
    assert info["fitted_minutes"] == pytest.approx(slow.train_minutes)  # exactly half, so no rounding loss
    assert fitted.tokenizer_batch == BUDGET.tokenizer_batch and fitted.guidance_scale == BUDGET.guidance_scale
    assert "tokenizer 1200 -> 600 steps (GAN from 200), prior 1000 -> 500 steps" in describe_fit(slow, fitted, info)
    # Rounded down to multiples of 50, never below 50.
    tiny_target = dataclasses.replace(BUDGET, train_minutes=0.01)
    fitted, _ = fit_budget(tiny_target, SECONDS, overhead=1.0)
    assert (fitted.tokenizer_steps, fitted.prior_steps) == (50, 50)


@pytest.mark.parametrize("modality, num_classes", [("image", 10), ("text", 0)])
def test_the_probe_times_real_steps_of_each_stage(modality, num_classes):
    seconds = probe_step_seconds(dataclasses.replace(BUDGET, tokenizer_batch=2, prior_batch=2), modality, 1,
                                 num_classes, "random-vgg", warmup=1, steps=2)
    for value in (seconds.vqvae, seconds.vqgan, seconds.prior):
        assert math.isfinite(value) and value > 0
    assert seconds.prior_compile == 0.0  # the tiny budget does not compile its priors


def test_compare_fits_once_keeps_the_fit_and_never_touches_explicit_steps(tmp_path, monkeypatch):
    calls = []

    def probe(*args, **kwargs):
        calls.append(args)
        return StepSeconds(vqvae=1.0, vqgan=2.0, prior=0.5)  # the standard budget would take far over 10 min

    monkeypatch.setattr(budget_fit, "probe_step_seconds", probe)
    # A quiet machine (the stand-in probe returns at once: a single tick of any other process would read as busy).
    monkeypatch.setattr(compare.ThreadGovernor, "measure_other_load", lambda self: 0.05)
    arguments = CompareArguments(budget="standard", train_minutes=10, output_dir=str(tmp_path))
    budget = arguments.resolved_budget()
    fitted, note = fitted_budget(arguments, budget, "digits", 10, tmp_path)
    assert len(calls) == 1 and fitted.tokenizer_steps < budget.tokenizer_steps and "scaled by" in note
    record = json.loads((tmp_path / "budget_fit.json").read_text())
    assert record["fitted"]["tokenizer_steps"] == fitted.tokenizer_steps
    again, _ = fitted_budget(arguments, budget, "digits", 10, tmp_path)  # reused: no second probe
    assert again == fitted and len(calls) == 1
    explicit = CompareArguments(budget="standard", train_minutes=10, prior_steps=700, output_dir=str(tmp_path))
    kept, note = fitted_budget(explicit, explicit.resolved_budget(), "digits", 10, tmp_path)
    assert kept.prior_steps == 700 and kept.tokenizer_steps == budget.tokenizer_steps
    assert note == "not fitted to 10 min: prior_steps given explicitly" and len(calls) == 1
    off = CompareArguments(budget="standard", train_minutes=0, output_dir=str(tmp_path))
    assert fitted_budget(off, off.resolved_budget(), "digits", 10, tmp_path) == (off.resolved_budget(), None)


def test_a_fit_timed_beside_a_busy_process_says_so(tmp_path, monkeypatch):
    def probe_beside_a_busy_loop(*args, **kwargs):  # the steps are "timed" while another process spins
        # Not a child of this one (whose ended children's CPU time the meter counts as its own, as a side-by-side
        # timing's processes are): a shell starts it in the background and exits.
        shell = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                               capture_output=True, text=True, check=True)
        try:
            time.sleep(1.5)
        finally:
            os.kill(int(shell.stdout), signal.SIGKILL)
        return StepSeconds(vqvae=1.0, vqgan=2.0, prior=0.5)

    monkeypatch.setattr(budget_fit, "probe_step_seconds", probe_beside_a_busy_loop)
    monkeypatch.setattr(compare, "FIT_ATTEMPTS", 2)  # busy every time: timed twice, then the note says so
    for folder in ("busy", "quiet"):
        (tmp_path / folder).mkdir()
    arguments = CompareArguments(budget="standard", train_minutes=10, output_dir=str(tmp_path / "busy"))
    _, note = fitted_budget(arguments, arguments.resolved_budget(), "digits", 10, tmp_path / "busy")
    record = json.loads((tmp_path / "busy" / "budget_fit.json").read_text())
    assert record["other_load_during_timing"] >= 0.5 and record["timing_attempts"] == 2
    assert "cores busy while the steps were timed" in note and record["note"] == note

    monkeypatch.setattr(budget_fit, "probe_step_seconds", lambda *args, **kwargs: StepSeconds(1.0, 2.0, 0.5))
    monkeypatch.setattr(compare.ThreadGovernor, "measure_other_load", lambda self: 0.05)  # a quiet machine
    _, note = fitted_budget(arguments, arguments.resolved_budget(), "digits", 10, tmp_path / "quiet")
    assert "busy" not in note and note.startswith("scaled by")


def test_a_bad_time_target_is_refused():
    with pytest.raises(ValueError, match="--train-minutes must be a finite number >= 0.0, got -1"):
        CompareArguments(train_minutes=-1)
    assert budget_for("quick", "image").train_minutes is None  # the quick budget runs its steps as they are


def test_each_priors_compilation_is_priced_once_and_never_scaled():
    compiled = StepSeconds(vqvae=0.1, vqgan=0.2, prior=0.05, prior_compile=20.0)
    assert predicted_training_seconds(BUDGET, compiled, overhead=1.5) == pytest.approx(690.0 + 40.0)
    # Target: the 40 s of compilation plus half the steps' 460 s: the steps are halved, the compilation stays.
    target = dataclasses.replace(BUDGET, train_minutes=(40 + 230) / 60)
    fitted, info = fit_budget(target, compiled, overhead=1.0)
    assert info["scale"] == pytest.approx(0.5)
    assert (fitted.tokenizer_steps, fitted.prior_steps) == (600, 500)
    assert info["fitted_minutes"] == pytest.approx(target.train_minutes)


def test_the_probe_measures_the_priors_compilation(monkeypatch):
    """With prior_compile the probe runs the compiled loss, and the warm-up's excess over its steps is the compile
    time (here a stand-in compile that spends 0.5 s on its first call)."""
    import time

    def slow_first_call(function):
        calls = []

        def run(*args, **kwargs):
            if not calls:
                time.sleep(0.5)
            calls.append(1)
            return function(*args, **kwargs)
        return run

    monkeypatch.setattr(budget_fit.torch, "compile", slow_first_call)
    budget = dataclasses.replace(BUDGET, tokenizer_batch=2, prior_batch=2, prior_compile=True)
    seconds = probe_step_seconds(budget, "image", 1, 10, "random-vgg", warmup=2, steps=2)
    assert 0.4 < seconds.prior_compile < 0.5 + 2 * seconds.prior + 0.1
    assert probe_step_seconds(dataclasses.replace(budget, prior_compile=False), "image", 1, 10, "random-vgg",
                              warmup=2, steps=2).prior_compile == 0.0


def test_compare_drops_the_priors_compile_only_where_it_cannot_build(monkeypatch, capsys):
    from pipelines import compare

    def unavailable():
        raise ValueError("--compile: torch.compile cannot build kernels on this machine (no C++ compiler); install one")

    standard = CompareArguments(budget="standard")
    assert standard.resolved_budget().prior_compile and not budget_for("quick", "image").prior_compile
    monkeypatch.setattr(compare, "check_compile_available", lambda: None)
    assert compare.compile_if_available(standard.resolved_budget(), standard).prior_compile
    monkeypatch.setattr(compare, "check_compile_available", unavailable)
    assert not compare.compile_if_available(standard.resolved_budget(), standard).prior_compile
    assert "the priors train without torch.compile" in capsys.readouterr().out
    asked = CompareArguments(budget="standard", prior_compile=True)  # asked for explicitly: the run fails clearly
    assert compare.compile_if_available(asked.resolved_budget(), asked).prior_compile


def test_a_fit_disturbed_for_a_moment_is_timed_again_and_keeps_the_fastest_steps(tmp_path, monkeypatch):
    # First probe beside a busy neighbour (slow steps), the second on a quiet machine: the fit uses the quiet timing.
    probes = iter([StepSeconds(vqvae=2.0, vqgan=1.5, prior=1.0), StepSeconds(vqvae=1.0, vqgan=3.0, prior=0.5)])
    loads = iter([0.9, 0.05])
    monkeypatch.setattr(budget_fit, "probe_step_seconds", lambda *args, **kwargs: next(probes))
    monkeypatch.setattr(compare.ThreadGovernor, "measure_other_load", lambda self: next(loads))
    arguments = CompareArguments(budget="standard", train_minutes=10, output_dir=str(tmp_path))
    budget = arguments.resolved_budget()
    fitted, note = fitted_budget(arguments, budget, "digits", 10, tmp_path)
    expected, _ = budget_fit.fit_budget(budget, StepSeconds(vqvae=1.0, vqgan=1.5, prior=0.5))  # each job's fastest
    assert fitted == expected and "busy" not in note
    record = json.loads((tmp_path / "budget_fit.json").read_text())
    assert record["timing_attempts"] == 2 and record["other_load_during_timing"] == 0.05


def test_the_priors_refit_spends_what_the_tokenizers_left_within_bounds():
    from pipelines.budget_fit import describe_refit, refit_prior_steps

    fitted = dataclasses.replace(BUDGET, prior_steps=1000)
    # 100 s left, 2 x 10 s of compilation, 2 priors x 0.01 s per step: 4,000 steps (capped by the budget's own).
    refitted, info = refit_prior_steps(fitted, 5000, 100.0, 0.01, 10.0, overhead=1.0)
    assert refitted.prior_steps == 4000 and refitted.tokenizer_steps == fitted.tokenizer_steps
    assert info["predicted_minutes"] == pytest.approx(100 / 60) and not info["at_floor"]
    assert "1000 -> 4000 steps" in describe_refit(info) and "overrun" not in describe_refit(info)
    assert refit_prior_steps(fitted, 3000, 100.0, 0.01, 10.0, overhead=1.0)[0].prior_steps == 3000
    assert refit_prior_steps(fitted, 5000, 100.0, 0.01, 10.0, overhead=2.0)[0].prior_steps == 2000
    # Nothing left (the tokenizers overran): half the first fit, and the note says the target is overrun.
    starved, info = refit_prior_steps(fitted, 5000, -30.0, 0.01, 10.0, overhead=1.0)
    assert starved.prior_steps == 500 and info["at_floor"] and "overrun the target" in describe_refit(info)


def test_compare_times_the_priors_again_after_the_tokenizers_and_keeps_that_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_fit, "probe_step_seconds",
                        lambda *args, **kwargs: StepSeconds(vqvae=0.01, vqgan=0.02, prior=0.005))
    arguments = CompareArguments(budget="standard", train_minutes=10, output_dir=str(tmp_path))
    planned = arguments.resolved_budget()
    fitted, _ = fitted_budget(arguments, planned, "digits", 10, tmp_path)
    assert planned.prior_steps / 2 < fitted.prior_steps < planned.prior_steps
    probes = []

    def probe(*args, seconds=0.01, **kwargs):
        probes.append(args)
        return seconds, 0.0

    monkeypatch.setattr(budget_fit, "probe_prior_seconds", probe)
    # The tokenizers took 241 s of the 600: 359 s left for 2 priors at 0.01 s x 1.2 per step, 14,950 steps.
    refitted, note = compare.refit_priors(arguments, planned, fitted, "digits", 10, tmp_path, 241.0)
    assert refitted.prior_steps == 14950 and len(probes) == 1
    assert dataclasses.replace(refitted, prior_steps=fitted.prior_steps) == fitted  # nothing else moved
    assert note.startswith("priors timed again after the tokenizers (6.0 min of the target left, 10 ms per step)")
    record = json.loads((tmp_path / "budget_fit.json").read_text())
    assert record["prior_refit"]["prior_steps"] == 14950 and record["fitted"] == dataclasses.asdict(fitted)
    # A rerun that reuses the tokenizers reuses this fit, without timing anything.
    again, again_note = compare.refit_priors(arguments, planned, fitted, "digits", 10, tmp_path, None)
    assert again == refitted and again_note == note and len(probes) == 1
    # Tokenizers that overran the target leave the priors half the first fit.
    starved, note = compare.refit_priors(arguments, planned, fitted, "digits", 10, tmp_path, 700.0)
    assert starved.prior_steps == fitted.prior_steps // 100 * 50 and "overrun the target" in note
    # Explicit steps, or no time target: nothing is refitted or timed.
    explicit = CompareArguments(budget="standard", train_minutes=10, prior_steps=700, output_dir=str(tmp_path))
    assert compare.refit_priors(explicit, planned, fitted, "digits", 10, tmp_path, 241.0) == (fitted, None)
    untimed = CompareArguments(budget="quick", output_dir=str(tmp_path))
    quick = untimed.resolved_budget()
    assert compare.refit_priors(untimed, quick, quick, "digits", 10, tmp_path, 241.0) == (quick, None)
    assert len(probes) == 2


def test_side_by_side_stages_are_priced_as_they_run():
    from pipelines.budget_fit import side_by_side_seconds

    # 100 steps each at 0.1 and 0.2 s side by side: the faster ends at 10 s with the slower half done; the slower's
    # other 50 steps alone at 0.12 s: 16 s. Which job is given first does not matter.
    assert side_by_side_seconds(100, 0.1, 0.2, 0.12) == pytest.approx(16.0)
    assert side_by_side_seconds(100, 0.2, 0.1, 0.12) == pytest.approx(16.0)
    assert side_by_side_seconds(100, 0.2, 0.2, 0.12) == pytest.approx(20.0)  # equal jobs end together
    together = StepSeconds(vqvae=0.06, vqgan=0.12, prior=0.05, prior_compile=20.0, vqvae_together=0.1,
                           vqgan_together=0.2, prior_together=0.09)
    assert together.together and not SECONDS.together
    # 1,200 tokenizer steps: 1,200 x (0.1 + 0.5 x 0.12) = 192 s; 1,000 prior steps side by side: 90 s; one round of
    # compilation (both priors compile at once), never scaled by the overhead.
    assert predicted_training_seconds(BUDGET, together, overhead=1.5) == pytest.approx(1.5 * (192 + 90) + 20)
    target = dataclasses.replace(BUDGET, train_minutes=(20 + 141) / 60)  # half the steps' 282 s
    fitted, info = fit_budget(target, together, overhead=1.0)
    assert info["scale"] == pytest.approx(0.5) and (fitted.tokenizer_steps, fitted.prior_steps) == (600, 500)


def test_the_priors_refit_side_by_side_runs_them_in_one_round():
    from pipelines.budget_fit import describe_refit, refit_prior_steps

    fitted = dataclasses.replace(BUDGET, prior_steps=1000)
    # 100 s left, 10 s of compilation once, each prior at 0.02 s per step beside the other: 4,500 steps.
    refitted, info = refit_prior_steps(fitted, 5000, 100.0, 0.02, 10.0, overhead=1.0, jobs=2)
    assert refitted.prior_steps == 4500 and info["predicted_minutes"] == pytest.approx(100 / 60)
    assert "20 ms per step beside each other): 1000 -> 4500 steps" in describe_refit(info)
    assert refit_prior_steps(fitted, 5000, 100.0, 0.02, 10.0, overhead=1.0)[0].prior_steps == 2000  # two rounds


@pytest.mark.parametrize("jobs", [("vqvae", "vqgan"), ("prior", "prior")])
def test_the_side_by_side_probe_times_both_jobs_in_their_own_processes(jobs):
    budget = dataclasses.replace(BUDGET, tokenizer_batch=2, prior_batch=2)
    seconds = budget_fit.probe_together(jobs, budget, "image", 1, 10, "random-vgg", threads=1, warmup=1,
                                        seconds=0.2, windows=2)
    assert len(seconds) == 2 and all(math.isfinite(value) and value > 0 for value in seconds)


def test_a_side_by_side_probe_that_fails_says_why_and_leaves_no_process():
    # An unknown variant: its worker fails building the model (its error is quoted), while the other waits, ready,
    # to be killed.
    with pytest.raises(RuntimeError, match=r"timing the training steps side by side failed:\n(.|\n)*no-such-variant"):
        budget_fit.probe_together(("vqvae", "no-such-variant"), BUDGET, "image", 1, 10, "random-vgg", threads=1,
                                  seconds=0.1)
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    if children.is_file():  # Linux
        assert children.read_text().split() == []


def test_compare_fits_side_by_side_runs_and_refits_when_the_jobs_change(tmp_path, monkeypatch):
    calls = []

    def probe(*args, together_threads=None, **kwargs):
        calls.append(together_threads)
        if together_threads is None:
            return StepSeconds(vqvae=0.02, vqgan=0.04, prior=0.01)
        return StepSeconds(vqvae=0.02, vqgan=0.04, prior=0.01, vqvae_together=0.025, vqgan_together=0.05,
                           prior_together=0.015)

    monkeypatch.setattr(budget_fit, "probe_step_seconds", probe)
    monkeypatch.setattr(compare.ThreadGovernor, "measure_other_load", lambda self: 0.05)
    arguments = CompareArguments(budget="standard", train_minutes=10, threads=4, output_dir=str(tmp_path))
    planned = arguments.resolved_budget()
    side_by_side, _ = fitted_budget(arguments, planned, "digits", 10, tmp_path, jobs=2)
    assert calls == [2]  # each job timed on half of --threads 4
    one_by_one, _ = fitted_budget(arguments, planned, "digits", 10, tmp_path, jobs=1)  # not the kept fit: refitted
    # One by one: 1.3 x (9,600 x 0.06 + 2 x 22,000 x 0.01) = 1,321 s for 600: scaled by 0.45. Side by side:
    # 1.3 x (9,600 x (0.025 + 0.5 x 0.04) + 22,000 x 0.015) = 990 s: scaled by 0.61.
    assert calls == [2, None] and (side_by_side.tokenizer_steps, one_by_one.tokenizer_steps) == (5800, 4350)
    assert json.loads((tmp_path / "budget_fit.json").read_text())["jobs"] == 1

    fitted, _ = fitted_budget(arguments, planned, "digits", 10, tmp_path, jobs=2)
    timed = []

    def probe_priors(jobs, *args, seconds=3.0, **kwargs):
        timed.append((jobs, args[-1]))
        return [0.03, 0.04]  # the slower of the two counts

    monkeypatch.setattr(budget_fit, "probe_together", probe_priors)
    # 241 s of 600 used: 359 s left, one round at 0.04 s x 1.2 per step (no compilation in this budget's timing):
    # 7,450 steps (two rounds would be 3,700, under the floor of half the first fit's 13,300).
    refitted, note = compare.refit_priors(arguments, planned, fitted, "digits", 10, tmp_path, 241.0, jobs=2)
    assert timed == [(("prior", "prior"), 2)] and (fitted.prior_steps, refitted.prior_steps) == (13300, 7450)
    assert "beside each other" in note
