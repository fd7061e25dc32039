"""`vqgen compare`: train VQ-VAE and VQGAN under one budget, a prior on each, evaluate, judge and report.

The flow runs one way: CompareArguments -> a Budget (its steps fitted to the machine) -> per seed, both variants'
stage-1 training arguments, then (the priors' steps fitted again to the minutes left) both stage-2 ones, each run
as a child process from a JSON file -> per seed, `evaluate_images` / `evaluate_texts` -> one
CompareResult (means, spreads, intervals, verdict) saved as metrics.json -> the report, which only formats it.
The first seed's runs live in DIR/tokenizers and DIR/pipelines, further seeds' in DIR/seeds/seed_<n>/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stage1_tokenizer.data import load_split
from stage1_tokenizer.threads import ThreadGovernor, set_torch_threads
from stage1_tokenizer.train_utils import check_compile_available
from stage2_prior.folder import library_versions
from stage2_prior.sampling import describe_precision

from .budgets import (DEFAULT_DATASETS, VARIANTS, Budget, CompareArguments, prior_arguments,
                      tokenizer_arguments)
from .evaluate import SAMPLE_BATCH, evaluate_images, evaluate_texts
from .pipeline import VQPipeline
from .result import CompareResult, aggregate, read_gan_health

RUN_SETTINGS = "compare_settings.json"  # what a reusable run folder was trained with
# Cores other processes may keep busy while the fit times its steps before the note says the fit is too small (a
# 30-second test run beside the fit's timing cut one fit from 0.53 to 0.36 of the budget's steps).
BUSY_DURING_FIT = 0.25
# A fit timed beside other work is timed again, up to this many times; each job's fastest timing counts (other
# work only ever slows a step), so a moment's disturbance does not shrink a whole run's steps.
FIT_ATTEMPTS = 3


def _run(module: str, arguments, log_path: Path) -> None:
    """Run a training script in a child process (fresh memory, its own progress bar) on a JSON file of its
    arguments; stream and log its output; fail loudly."""
    arguments_path = log_path.with_suffix(".json")
    arguments_path.write_text(json.dumps(dataclasses.asdict(arguments), indent=2))
    command = [sys.executable, "-m", module, str(arguments_path)]
    print(f"$ {' '.join(command)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      env=env, text=True) as process:
        for line in process.stdout:
            log.write(line)
            sys.stdout.write(line)
            sys.stdout.flush()
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"{module} failed with exit code {code}; see {log_path}")


def _reusable(folder: Path, settings: dict, done_file: str) -> bool:
    marker = folder / RUN_SETTINGS
    return (folder / done_file).is_file() and marker.is_file() and json.loads(marker.read_text()) == settings


def tokenizer_settings(stage1) -> dict:
    """What a tokenizer run is matched on: its arguments after the presets' defaults are filled in, and the model
    config they build, so a run trained under an older default is retrained rather than reused, whether the default
    was a training argument's (a preset's learning rate) or the model's (the GAN recipe's fields)."""
    from stage1_tokenizer.train import build_config

    resolved = stage1.resolved()
    config = build_config(resolved, None, None).to_dict()
    config.pop("transformers_version", None)
    return json.loads(json.dumps({**dataclasses.asdict(resolved), "model_config": config}))  # as the marker reads


def seed_folder(output_dir: Path, index: int, seed: int) -> Path:
    return output_dir if index == 0 else output_dir / "seeds" / f"seed_{seed}"


def _train_unless_reusable(module: str, run_arguments, folder: Path, settings: dict, done_file: str, what: str,
                           log_path: Path, force: bool) -> float | None:
    """Run `module` on `run_arguments` into `folder`, unless (and not `force`) the folder holds a finished run
    (`done_file`) trained with these `settings`; its wall-clock seconds, or None when reused."""
    if not force and _reusable(folder, settings, done_file):
        print(f"reusing the {what} in {folder} (pass --force to retrain)")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_SETTINGS).unlink(missing_ok=True)
    start = time.time()
    _run(module, run_arguments, log_path)
    (folder / RUN_SETTINGS).write_text(json.dumps(settings))
    return time.time() - start


def train_tokenizer(variant: str, budget: Budget, arguments: CompareArguments, dataset: str, seed: int,
                    root: Path) -> dict:
    """Train (or reuse) one tokenizer under `root`; returns its wall-clock seconds when it trained."""
    tokenizer_dir = root / "tokenizers" / variant
    stage1 = tokenizer_arguments(budget, variant, dataset, arguments.modality, seed, arguments.perceptual,
                                 tokenizer_dir, arguments.threads)
    seconds = _train_unless_reusable("stage1_tokenizer.train", stage1, tokenizer_dir, tokenizer_settings(stage1),
                                     "model.safetensors", f"{variant} tokenizer",
                                     root / f"train_tokenizer_{variant}.log", arguments.force)
    return {} if seconds is None else {"tokenizer_seconds": seconds}


def train_prior(variant: str, budget: Budget, arguments: CompareArguments, dataset: str, class_conditional: bool,
                seed: int, root: Path, retrain: bool = False) -> dict:
    """Train (or reuse) the prior on `root`'s `variant` tokenizer (always retrained with `retrain`: its tokenizer
    just was); returns its wall-clock seconds when it trained."""
    tokenizer_dir, prior_dir = root / "tokenizers" / variant, root / "pipelines" / variant
    stage2 = prior_arguments(budget, tokenizer_dir, dataset, seed, class_conditional, prior_dir, arguments.threads)
    prior_settings = dict(dataclasses.asdict(stage2.resolved()),
                          tokenizer_weights_mtime=(tokenizer_dir / "model.safetensors").stat().st_mtime)
    seconds = _train_unless_reusable("stage2_prior.train", stage2, prior_dir, prior_settings, "pipeline_config.json",
                                     f"{variant} prior", root / f"train_prior_{variant}.log",
                                     arguments.force or retrain)
    return {} if seconds is None else {"prior_seconds": seconds}


def evaluate_seed(root: Path, budget: Budget, dataset: str, modality: str, seed: int) -> dict:
    """Both variants' metrics (with intervals and figures under `root`) for one seed's pipelines."""
    pipes = {v: VQPipeline.from_pretrained(root / "pipelines" / v) for v in VARIANTS}
    if modality == "image":
        run = evaluate_images(pipes, dataset, budget.num_eval_samples, budget.guidance_scale, root, seed)
    else:
        run = evaluate_texts(pipes, dataset, budget.num_eval_samples, budget.guidance_scale, seed)
    run["prior"] = {v: p.metadata.get("prior_metrics", {}) for v, p in pipes.items()}
    run["gan_health"] = read_gan_health(root / "tokenizers" / "vqgan" / "metrics.jsonl")
    return run


def compile_if_available(budget: Budget, arguments: CompareArguments) -> Budget:
    """The budget, without the priors' torch.compile where it cannot build kernels here (e.g. no C++ compiler) and
    the user did not ask for it: it only saves time, so the comparison runs without it and says so."""
    if not budget.prior_compile or "prior_compile" in arguments.overrides():
        return budget
    try:
        check_compile_available()
    except ValueError as error:
        print(f"note: the priors train without torch.compile: {str(error).split(';')[0]}", flush=True)
        return dataclasses.replace(budget, prior_compile=False)
    return budget


def input_channels(arguments: CompareArguments, dataset: str) -> int:
    """The images' channels (1 for text), as the fit's timing builds its models."""
    from stage1_tokenizer.train import infer_channels

    return infer_channels(load_split(dataset, "train", "image")) if arguments.modality == "image" else 1


def _explicit_steps(arguments: CompareArguments) -> list[str]:
    """The step counts given on the command line (or in a budget file): never fitted."""
    return sorted({"tokenizer_steps", "prior_steps", "disc_start"} & set(arguments.overrides()))


def fitted_budget(arguments: CompareArguments, budget: Budget, dataset: str, num_classes: int,
                  output_dir: Path) -> tuple[Budget, str | None]:
    """The budget with its steps fitted to `train_minutes` on this machine (pipelines/budget_fit.py) and a line
    saying what was done. The fit is kept in output_dir/budget_fit.json, so a rerun reuses its runs."""
    if not budget.train_minutes:
        return budget, None
    explicit = _explicit_steps(arguments)
    if explicit:
        return budget, f"not fitted to {budget.train_minutes:g} min: {', '.join(explicit)} given explicitly"
    record = output_dir / "budget_fit.json"
    if record.is_file() and not arguments.force:
        saved = json.loads(record.read_text())
        if saved.get("budget") == dataclasses.asdict(budget):
            print(f"budget fit (from {record}): {saved['note']}")
            return Budget(**saved["fitted"]), saved["note"]
    from .budget_fit import describe_fit, fastest, fit_budget, probe_step_seconds

    print(f"timing a few training steps of each stage to fit the budget to {budget.train_minutes:g} min", flush=True)
    in_channels = input_channels(arguments, dataset)
    seconds = None
    meter = ThreadGovernor(max_threads=1)  # only its load measurement: what other processes took meanwhile
    for attempt in range(1, FIT_ATTEMPTS + 1):
        timed = probe_step_seconds(budget, arguments.modality, in_channels, num_classes, arguments.perceptual)
        load = meter.measure_other_load()  # since the last measurement: this attempt's
        seconds = timed if seconds is None else fastest(seconds, timed)
        if (load or 0.0) < BUSY_DURING_FIT or attempt == FIT_ATTEMPTS:
            break
        print(f"other processes kept {load:.1f} cores busy while the steps were timed: timing them again", flush=True)
    fitted, info = fit_budget(budget, seconds)
    info.update(other_load_during_timing=load, timing_attempts=attempt)
    note = describe_fit(budget, fitted, info)
    if (load or 0.0) >= BUSY_DURING_FIT:
        note += (f"; other processes kept {load:.1f} cores busy while the steps were "
                 f"timed, so the fit is smaller than an idle machine's (rerun on a quiet machine with --force)")
    print(f"budget fit: {note}", flush=True)
    record.write_text(json.dumps({"budget": dataclasses.asdict(budget), "fitted": dataclasses.asdict(fitted),
                                  "note": note, **info}, indent=2))
    return fitted, note


def refit_priors(arguments: CompareArguments, planned: Budget, budget: Budget, dataset: str, num_classes: int,
                 output_dir: Path, tokenizer_seconds: float | None) -> tuple[Budget, str | None]:
    """The fitted `budget` with its priors' steps fitted again to what the time target has left after both
    tokenizers trained for `tokenizer_seconds` (None: one or both were reused), and a line saying so.

    The first fit times a few seconds of a machine whose speed drifts (this one's by about 20% within an hour): two
    Fashion-MNIST runs trained in 0.85x and 1.3x its prediction. Timing the priors again just before they train, with
    the tokenizers' real minutes known, keeps the whole run to its target. Kept in budget_fit.json beside the fit,
    so a rerun that reuses the tokenizers trains its priors with the same steps."""
    if not budget.train_minutes or _explicit_steps(arguments):
        return budget, None
    record_path = output_dir / "budget_fit.json"
    record = json.loads(record_path.read_text())
    if tokenizer_seconds is None:
        saved = record.get("prior_refit")
        if saved is None:
            return budget, None
        print(f"prior steps (from {record_path}): {saved['note']}")
        return dataclasses.replace(budget, prior_steps=saved["prior_steps"]), saved["note"]
    from .budget_fit import describe_refit, probe_prior_seconds, refit_prior_steps

    start = time.time()
    prior, prior_compile = probe_prior_seconds(budget, arguments.modality, input_channels(arguments, dataset),
                                               num_classes, steps=30)
    seconds_left = budget.train_minutes * 60 - tokenizer_seconds - (time.time() - start)
    refitted, info = refit_prior_steps(budget, planned.prior_steps, seconds_left, prior, prior_compile)
    note = describe_refit(info)
    print(f"budget fit: {note}", flush=True)
    record["prior_refit"] = {**info, "note": note}
    record_path.write_text(json.dumps(record, indent=2))
    return refitted, note


def run_compare(arguments: CompareArguments) -> CompareResult:
    """Train both variants for every seed, evaluate, judge, and write metrics.json and the report."""
    from .report import write_report

    if arguments.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(arguments.threads)  # the training processes inherit it
    set_torch_threads(arguments.threads)
    started = time.time()
    budget = arguments.resolved_budget()
    dataset = arguments.dataset or DEFAULT_DATASETS[arguments.modality]
    class_names = load_split(dataset, "train", arguments.modality).class_names
    class_conditional = arguments.class_conditional
    if class_conditional is None:
        class_conditional = class_names is not None
    if class_conditional and class_names is None:
        raise ValueError(f"--class-conditional needs a labelled data set; {dataset!r} has no 'label' column")
    output_dir = Path(arguments.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    planned = compile_if_available(budget, arguments)
    num_classes = len(class_names) if class_conditional else 0
    budget, fit_note = fitted_budget(arguments, planned, dataset, num_classes, output_dir)
    seeds = arguments.seed_list
    runs = []
    for index, seed in enumerate(seeds):
        root = seed_folder(output_dir, index, seed)
        timings = {variant: {} for variant in VARIANTS}
        for variant in VARIANTS:  # both tokenizers first: their minutes decide what the priors get
            print(f"== seed {seed}, {variant}: tokenizer ({arguments.budget} budget) ==", flush=True)
            timings[variant].update(train_tokenizer(variant, budget, arguments, dataset, seed, root))
        if index == 0:  # further seeds train their priors with the first seed's steps
            trained = [t["tokenizer_seconds"] for t in timings.values() if "tokenizer_seconds" in t]
            budget, refit_note = refit_priors(arguments, planned, budget, dataset, num_classes, output_dir,
                                              sum(trained) if len(trained) == len(VARIANTS) else None)
            if refit_note:
                fit_note = f"{fit_note}; {refit_note}"
        for variant in VARIANTS:
            print(f"== seed {seed}, {variant}: prior ({arguments.budget} budget) ==", flush=True)
            timings[variant].update(train_prior(variant, budget, arguments, dataset, class_conditional, seed, root,
                                                retrain="tokenizer_seconds" in timings[variant]))
        print(f"== seed {seed}: evaluation ==", flush=True)
        run = evaluate_seed(root, budget, dataset, arguments.modality, seed)
        run["training"] = {v: t for v, t in timings.items() if t}
        runs.append(run)
    settings = dict(
        dataset=dataset, modality=arguments.modality, budget=arguments.budget, seeds=seeds,
        overrides=arguments.overrides(), class_conditional=class_conditional,
        class_names=class_names if class_conditional else None, perceptual_backend=arguments.perceptual,
        elapsed_seconds=time.time() - started, library_versions=library_versions(), **dataclasses.asdict(budget))
    if fit_note:
        settings["budget_fit"] = fit_note
    pipes = {variant: VQPipeline.from_pretrained(output_dir / "pipelines" / variant) for variant in VARIANTS}
    # Whether the evaluation's sample batches ran bf16 matmuls depends on the machine: the report says.
    settings["sampling_precision"] = describe_precision(pipes[VARIANTS[0]].prior,
                                                        min(SAMPLE_BATCH, budget.num_eval_samples))
    result = aggregate(settings, runs, seeds)
    for variant, pipe in pipes.items():  # the model cards state what the comparison measured
        pipe.metadata["evaluation_metrics"] = {group: getattr(result, group)[variant]
                                               for group in ("reconstruction", "generation")
                                               if variant in getattr(result, group)}
        pipe.save_metadata(output_dir / "pipelines" / variant)
    result.save(output_dir / "metrics.json")
    html, markdown = write_report(output_dir, result)
    print(f"wrote {html}, {markdown} and {output_dir / 'metrics.json'}")
    return result
