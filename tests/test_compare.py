"""`vqgen compare` end to end on the built-in digits, with a budget of a few steps: every file it promises, every
metric the design names for both variants and the real-data row, loadable pipelines, and reuse on a second run."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from pipelines import budgets, classifier
from pipelines.budgets import Budget, CompareArguments, budget_for
from pipelines.cli import main
from pipelines.pipeline import VQPipeline
from stage2_prior.modeling import PRIOR_PRESETS

GENERATION = ("fd_classifier", "kid_mean", "inception_score", "precision", "recall", "class_hist_kl", "class_accuracy")
RECONSTRUCTION = ("mse", "psnr", "ssim", "fd_classifier", "classifier_accuracy", "codebook_usage", "perplexity")


# The quick budget cut to a few steps with command-line overrides (text's quick budget uses the `small` tokenizer).
FEW_STEPS = ["--tokenizer-preset", "tiny", "--tokenizer-steps", "3", "--tokenizer-batch", "8", "--disc-start", "1",
             "--prior-steps", "3", "--prior-batch", "8", "--num-eval-samples", "40"]


@pytest.fixture
def few_step_budget(tmp_path, monkeypatch, offline_env):
    """Caches inside tmp_path (the children inherit VQGEN_CACHE); the output folder of a few-step compare."""
    monkeypatch.setenv("VQGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(classifier, "DEFAULT_CACHE_DIR", tmp_path / "cache" / "classifiers")
    return tmp_path / "compare"


def test_compare_writes_report_metrics_and_pipelines_then_reuses_them(few_step_budget, capsys):
    out = few_step_budget
    main(["compare", "--budget", "quick", *FEW_STEPS, "--output-dir", str(out), "--jobs", "2"])
    first_run = capsys.readouterr().out
    assert "reusing" not in first_run
    # Both tokenizers train, side by side, before either prior (whose steps may be fitted to the minutes left).
    tokenizers = first_run.index("== seed 0: tokenizers (side by side)")
    priors = first_run.index("== seed 0: priors (side by side)")
    assert tokenizers < priors
    for stage, section in (("stage1_tokenizer", first_run[tokenizers:priors]), ("stage2_prior", first_run[priors:])):
        lines = section.splitlines()
        launched = [i for i, line in enumerate(lines) if line.startswith("$ ") and f"{stage}.train" in line]
        assert len(launched) == 2  # the second started before the first ended (its output's last line)
        assert launched[1] < max(i for i, line in enumerate(lines) if line.startswith("[vqvae] "))
        assert any(line.startswith("[vqgan] ") for line in lines)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["dataset"] == "digits" and metrics["settings"]["class_conditional"] is True
    assert metrics["settings"]["tokenizer_steps"] == 3 and metrics["settings"]["overrides"]["prior_steps"] == 3
    assert metrics["settings"]["seeds"] == [0] and metrics["verdict"]["seed_variation_measured"] is False
    # How the samples were drawn is machine-dependent (bf16 matmuls on a CPU with native bf16), so the report says.
    from stage1_tokenizer.precision import bf16_is_fast

    assert metrics["settings"]["sampling_precision"].startswith("bf16 matmul" if bf16_is_fast("cpu") else "float32")
    assert "seed-to-seed variation was not measured" in metrics["verdict"]["summary"]
    for variant in ("vqvae", "vqgan"):  # bootstrap intervals around the sample metrics that have one
        for key in ("fd_classifier", "kid_mean", "precision", "class_accuracy"):
            low, high = metrics["intervals"]["generation"][variant][key]
            assert low <= high, key
        for key in ("fd_classifier", "precision", "class_accuracy"):  # (KID's subsets differ from the bootstrap's)
            low, high = metrics["intervals"]["generation"][variant][key]
            assert low <= metrics["generation"][variant][key] <= high, key
    for variant in ("vqvae", "vqgan"):
        for key in GENERATION:
            assert isinstance(metrics["generation"][variant][key], float), (variant, key)
        for key in RECONSTRUCTION:
            assert isinstance(metrics["reconstruction"][variant][key], float), (variant, key)
        assert "val_bits_per_code" in metrics["prior"][variant]
        pipe = VQPipeline.from_pretrained(out / "pipelines" / variant)
        assert pipe.tokenizer.config.variant == variant
        assert pipe.generate(num_samples=2, class_labels=[3, 4], seed=0).images[0].size == (16, 16)
    for key in GENERATION:  # the real-data row, computed with the same N
        assert isinstance(metrics["generation"]["real"][key], float), key

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # sample grids (2 + real), reconstructions, plots: inline
    assert 'src="http' not in html and "src='http" not in html
    markdown = (out / "report.md").read_text()
    assert "FD-classifier" in markdown and "| VQ-VAE | VQGAN |" in markdown
    assert "| Overrides | tokenizer_preset tiny, tokenizer_steps 3, tokenizer_batch 8, disc_start 1" in markdown
    assert "| Tokenizer steps | 3 |" in markdown  # the budget that ran
    for figure in metrics["figures"]["samples"].values():
        assert (out / figure).is_file()
    sweep = metrics["guidance_sweep"]  # against training images: 20 per point (half the 40 loaded)
    assert sweep["num_samples"] == 20  # (the real floor needs the 20 other images to hold the same labels)
    assert sweep["real_fd_classifier"] is None or sweep["real_fd_classifier"] > 0
    for variant in ("vqvae", "vqgan"):
        assert [row["guidance_scale"] for row in sweep["rows"][variant]] == [1.0, 1.5, 2.0, 3.0, 4.0]
        assert all(row["fd_classifier"] > 0 and 0 <= row["class_accuracy"] <= 1 for row in sweep["rows"][variant])
    assert (out / metrics["figures"]["guidance_sweep"]).is_file() and "Guidance sweep." in markdown

    weights = out / "tokenizers" / "vqgan" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    main(["compare", "--budget", "quick", *FEW_STEPS, "--output-dir", str(out)])
    second_run = capsys.readouterr().out
    assert "reusing the vqvae tokenizer" in second_run and "reusing the vqgan prior" in second_run
    assert weights.stat().st_mtime_ns == stamp


def test_budgets_apply_the_modality_changes_then_the_overrides(tmp_path):
    assert budget_for("quick", "text").tokenizer_preset == "small"  # text's change to the quick budget
    assert budget_for("quick", "image").tokenizer_preset == "tiny"
    assert budget_for("quick", "text", {"tokenizer_steps": 7}).tokenizer_steps == 7
    assert budgets.BUDGETS["quick"].tokenizer_steps == 500  # the shared table is not changed
    with pytest.raises(ValueError, match="budget 'huge' is unknown"):
        budget_for("huge", "image")
    budget_file = tmp_path / "budget.json"
    budget_file.write_text(json.dumps({"prior_steps": 11, "guidance_scale": 3.0}))
    arguments = CompareArguments(budget_file=str(budget_file), prior_steps=12)
    assert arguments.resolved_budget().prior_steps == 12  # the command line wins over the file
    assert arguments.resolved_budget().guidance_scale == 3.0
    assert isinstance(arguments.resolved_budget(), Budget)
    stage1 = budgets.tokenizer_arguments(
        budget_for("quick", "image", {"tokenizer_weight_ema": 0.99, "tokenizer_lr_schedule": "cosine"}), "vqgan",
        "digits", "image", 0, "none", tmp_path, None)
    assert (stage1.weight_ema, stage1.lr_schedule) == (0.99, "cosine")  # reach the training run
    with pytest.raises(ValueError, match="--tokenizer-lr-schedule 'step' is unknown"):  # a budget file's value
        budget_for("quick", "image", {"tokenizer_lr_schedule": "step"})
    # The standard budget's image tokenizers cool down (measured on held-out images); text keeps the constant rate.
    standard = budgets.tokenizer_arguments(budget_for("standard", "image"), "vqvae", "digits", "image", 0, "none",
                                           tmp_path, None)
    assert standard.lr_schedule == "cooldown" and standard.cooldown_steps is None  # a fifth of the fitted steps
    assert budget_for("standard", "text").tokenizer_lr_schedule == "constant"
    # Image tokenizers train at batch 8 for four times batch 32's steps (held-out study); text keeps batch 32.
    assert (standard.batch_size, standard.max_steps, standard.disc_start) == (8, 9600, 3200)
    assert budget_for("standard", "text").tokenizer_batch == 32
    # The image priors train at batch 8 too (held-out study); text priors keep 32.
    assert (budget_for("standard", "image").prior_batch, budget_for("standard", "text").prior_batch) == (8, 32)


def test_priors_validate_at_most_a_fixed_number_of_times(tmp_path):
    def eval_every(**fields):
        budget = budget_for("standard", "image", fields)
        return budgets.prior_arguments(budget, tmp_path, "digits", 0, True, tmp_path, None).eval_every

    preset_every = PRIOR_PRESETS["small"]["train"]["eval_every"]
    assert eval_every(prior_steps=2000) == preset_every  # a short run keeps the preset's interval
    long_run = eval_every(prior_steps=20000)
    assert long_run > preset_every and math.ceil(20000 / long_run) <= budgets.PRIOR_VALIDATIONS


@pytest.mark.parametrize("flags, message", [
    (["--tokenizer-steps", "0"], "--tokenizer-steps must be >= 1, got 0"),
    (["--num-eval-samples", "-5"], "--num-eval-samples must be >= 1, got -5"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number > 0.0, got nan"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--tokenizer-weight-ema", "1.5"], "--tokenizer-weight-ema must be in (0, 1), got 1.5"),
    (["--tokenizer-lr-schedule", "step"], "invalid choice: 'step'"),
    (["--budget", "huge"], "invalid choice: 'huge'"),
])
def test_bad_budget_overrides_are_refused_before_anything_runs(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--output-dir", str(tmp_path / "never"), *flags])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_budget_file_with_an_unknown_field_is_named(tmp_path, capsys):
    budget_file = tmp_path / "budget.json"
    budget_file.write_text(json.dumps({"prior_stpes": 11}))
    with pytest.raises(SystemExit):
        main(["compare", "--budget-file", str(budget_file)])
    assert "unknown fields ['prior_stpes']" in capsys.readouterr().err


TEXT_GENERATION = ("distinct_1", "distinct_2", "distinct_3", "self_bleu4", "length_mean", "ngram_perplexity",
                   "sentiment_agreement")


def _write_review_data(folder):
    """A tiny labelled text data set (parquet, ClassLabel labels), like SST-2 in shape."""
    import datasets

    good = ["a warm , funny and moving film", "the cast is wonderful", "one of the best films this year",
            "a smart , charming delight"]
    bad = ["a dull , lifeless mess", "the plot is tedious and flat", "one of the worst films this year",
           "a boring , clumsy failure"]
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    for split, repeats in (("train", 10), ("validation", 2)):
        rows = {"sentence": (bad + good) * repeats, "label": ([0] * 4 + [1] * 4) * repeats}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def test_text_compare_on_labelled_reviews_writes_texts_and_sentiment(few_step_budget, tmp_path, capsys):
    (tmp_path / "reviews").mkdir()
    data = _write_review_data(tmp_path / "reviews")
    out = few_step_budget
    main(["compare", "--modality", "text", "--dataset", str(data), "--budget", "quick", *FEW_STEPS,
          "--output-dir", str(out)])

    # The log names each evaluation phase and its seconds, as the image evaluation's does.
    log = capsys.readouterr().out
    for phase in ("the 5-gram model", "the sentiment classifier", "vqvae: reconstructions", r"vqgan: \d+ samples",
                  r"\d+ real texts"):
        assert re.search(rf"evaluating {phase}: \d+ s", log), phase
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["modality"] == "text" and metrics["settings"]["class_conditional"] is True
    assert metrics["settings"]["class_names"] == ["negative", "positive"]
    assert 0.5 <= metrics["classifier"]["sentiment_test_accuracy"] <= 1.0
    for variant in ("vqvae", "vqgan"):
        for key in TEXT_GENERATION:
            assert isinstance(metrics["generation"][variant][key], float), (variant, key)
        assert 0.0 <= metrics["generation"][variant]["sentiment_agreement"] <= 1.0
        for key in ("byte_accuracy", "exact_match", "codebook_usage", "perplexity"):
            assert isinstance(metrics["reconstruction"][variant][key], float), (variant, key)
        assert set(metrics["text_samples"][variant]) == {"negative", "positive"}
        pipe = VQPipeline.from_pretrained(out / "pipelines" / variant)
        texts = pipe.generate(num_samples=2, class_labels=[0, 1], seed=0).texts
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # The real row: held-out reviews with their true labels, judged by the same classifier.
    assert metrics["generation"]["real"]["sentiment_agreement"] == metrics["classifier"]["sentiment_test_accuracy"]
    html = (out / "report.html").read_text()
    assert "Class: positive" in html and "the cast is wonderful" in html
    assert "| VQ-VAE | VQGAN |" in (out / "report.md").read_text()


def test_a_run_trained_under_an_older_preset_default_is_retrained(tmp_path, monkeypatch):
    """Reuse compares the arguments with the presets' defaults filled in, and the model config they build: a
    changed default learning rate retrains, and so does a changed model default."""
    from pipelines import compare
    from stage1_tokenizer.configuration import TOKENIZER_PRESETS

    trained = []

    def fake_run_together(runs, threads):  # what finished runs leave behind, without training
        for run in runs:
            trained.append(run.module)
            (run.folder / run.done_file).write_text("{}")
        return {run.variant: 1.0 for run in runs}, []

    monkeypatch.setattr(compare, "_run_together", fake_run_together)
    budget = budget_for("quick", "image")
    arguments = CompareArguments(perceptual="none")

    def train():
        trained.clear()
        tokenizers = compare.train_runs([compare.tokenizer_run("vqvae", budget, arguments, "digits", 0, tmp_path,
                                                               None)], 2, None)
        compare.train_runs([compare.prior_run("vqvae", budget, arguments, "digits", True, 0, tmp_path, None,
                                              retrain="vqvae" in tokenizers)], 2, None)
        return list(trained)

    assert train() == ["stage1_tokenizer.train", "stage2_prior.train"]
    assert train() == []  # same settings: both reused
    preset = TOKENIZER_PRESETS[budget.tokenizer_preset]
    monkeypatch.setitem(preset, "train", {**preset["train"], "learning_rate": 3 * preset["train"]["learning_rate"]})
    assert train() == ["stage1_tokenizer.train", "stage2_prior.train"]  # the default moved: retrained
    assert train() == []
    # A model default moved (as the GAN recipe's fields are VQConfig defaults, not training arguments): retrained.
    monkeypatch.setitem(preset, "model", {**preset["model"], "disc_weight": 0.5})
    assert train() == ["stage1_tokenizer.train", "stage2_prior.train"]


FAKE_TRAINER = """
import json, sys, time
from pathlib import Path
arguments = json.loads(Path(sys.argv[1]).read_text())
print("started", arguments["name"], flush=True)
time.sleep(arguments["seconds"])
if arguments["fail"]:
    sys.exit(3)
Path(arguments["output_dir"], "done").write_text("{}")
print("finished", arguments["name"], flush=True)
"""


@dataclasses.dataclass
class FakeArguments:
    output_dir: str
    name: str
    seconds: float
    fail: bool = False


def test_runs_side_by_side_keep_what_finished_when_one_fails(tmp_path, monkeypatch, capsys):
    from pipelines import compare

    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    def run(variant, seconds, fail=False):
        folder = tmp_path / variant
        return compare.TrainingRun(variant, "tokenizer", "fake_trainer", FakeArguments(str(folder), variant, seconds,
                                   fail), folder, {"name": variant}, "done", tmp_path / f"{variant}.log")

    # The VQ-VAE's run fails at once; the VQGAN's, beside it, still finishes and is kept for a rerun.
    with pytest.raises(RuntimeError, match=r"fake_trainer \(vqvae\) failed with exit code 3; see .*vqvae.log"):
        compare.train_runs([run("vqvae", 0.0, fail=True), run("vqgan", 1.0)], 2, None)
    out = capsys.readouterr().out
    assert "[vqvae] started vqvae" in out and "[vqgan] finished vqgan" in out  # each line says whose it is
    assert (tmp_path / "vqgan.log").read_text() == "started vqgan\nfinished vqgan\n"
    assert run("vqgan", 1.0).reusable() and not run("vqvae", 0.0).reusable()
    # The rerun trains only the one that failed, alone (no prefix), and times it.
    seconds = compare.train_runs([run("vqvae", 0.0), run("vqgan", 1.0)], 2, None)
    out = capsys.readouterr().out
    assert set(seconds) == {"vqvae"} and "reusing the vqgan tokenizer" in out and "\nstarted vqvae" in out


def test_jobs_default_to_two_where_the_threads_can_be_halved(monkeypatch):
    from pipelines import compare

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert CompareArguments(threads=1).resolved_jobs() == 1 and CompareArguments(threads=3).resolved_jobs() == 2
    assert CompareArguments(threads=4, jobs=1).resolved_jobs() == 1
    assert compare.job_threads(CompareArguments(threads=5), 2) == 2
    assert compare.job_threads(CompareArguments(threads=1), 1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert CompareArguments().resolved_jobs() == 1
    with pytest.raises(ValueError, match="--jobs must be 1 or 2"):
        CompareArguments(jobs=3)


def test_side_by_side_output_names_its_run_and_thins_progress_bars(tmp_path, capsys):
    import io

    from pipelines import compare

    lines = ["loading\n", "prior:   1%|          | 1/100 [00:00<00:10]\n",
             "prior:   2%|          | 2/100 [00:00<00:10]\n", "prior: 100%|##########| 100/100 [00:10<00:00]\n", "done\n"]
    compare._relay(io.StringIO("".join(lines)), tmp_path / "run.log", "[vqgan] ")
    shown = capsys.readouterr().out.splitlines()
    # The first bar is shown, the next within PROGRESS_EVERY_S is not, the finished bar always is; the log has all.
    assert shown == ["[vqgan] " + line.rstrip("\n") for line in (lines[0], lines[1], lines[3], lines[4])]
    assert (tmp_path / "run.log").read_text() == "".join(lines)
    compare._relay(io.StringIO("".join(lines)), tmp_path / "alone.log", "")  # a run alone: everything, as it is
    assert capsys.readouterr().out == "".join(lines)
