"""`vqgen compare`: train VQ-VAE and VQGAN under one budget, a prior on each, evaluate, judge and report.

The flow runs one way: CompareArguments -> a Budget (its steps fitted to the machine) -> per seed, both variants'
stage-1 training arguments, then (the priors' steps fitted again to the minutes left) both stage-2 ones, each run
as a child process from a JSON file, the two variants' side by side (`--jobs 2`: each on half the cores) -> per
seed, `evaluate_images` / `evaluate_texts` -> one CompareResult (means, spreads, intervals, verdict) saved as
metrics.json -> the report, which only formats it.
The first seed's runs live in DIR/tokenizers and DIR/pipelines, further seeds' in DIR/seeds/seed_<n>/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from stage1_tokenizer.data import load_split
from stage1_tokenizer.threads import START_VARIABLE, ThreadGovernor, set_torch_threads, usable_cores, user_threads
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


# With runs side by side, each one's progress bar reaches the console at most this often (its log gets every line).
PROGRESS_EVERY_S = 30.0


@dataclass
class TrainingRun:
    """One training process of a compare: a variant's tokenizer or prior, and how to tell it may be reused."""

    variant: str
    stage: str  # "tokenizer" or "prior"
    module: str
    arguments: object  # the stage's training-arguments dataclass
    folder: Path
    settings: dict  # what a reusable run was trained with (RUN_SETTINGS)
    done_file: str  # present once the run finished
    log_path: Path
    force: bool = False

    def reusable(self) -> bool:
        if self.force or not (self.folder / self.done_file).is_file():
            return False
        marker = self.folder / RUN_SETTINGS
        return marker.is_file() and json.loads(marker.read_text()) == self.settings


def _relay(stream, log_path: Path, prefix: str) -> None:
    """Copy a child's output to its log, and to the console (with `prefix`, progress bars thinned, when set)."""
    shown = 0.0
    with open(log_path, "w") as log:
        for line in stream:
            log.write(line)
            log.flush()
            if prefix:
                if "%|" in line and "100%|" not in line:  # a progress bar's refresh ("  3%|▎    | 144/4650 [...")
                    if time.monotonic() - shown < PROGRESS_EVERY_S:
                        continue
                    shown = time.monotonic()
                line = prefix + line
            sys.stdout.write(line)
            sys.stdout.flush()


def _run_together(runs: list[TrainingRun], threads: int | None) -> tuple[dict[str, float], list[str]]:
    """Run the training scripts of `runs` at once, each in a child process (fresh memory, its own progress bar) on a
    JSON file of its arguments, with OMP_NUM_THREADS `threads` when set (else each governs its own threads, starting
    from its share of the cores); stream and log their output, and wait for all of them (one's failure does not stop
    the others). Returns the wall-clock seconds of those that succeeded, by variant, and a line for each that
    failed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    else:  # two processes on 2 threads each would spin against each other wherever no loop rebalances them
        env[START_VARIABLE] = str(max(1, usable_cores() // len(runs)))
    started, children = time.time(), []
    for run in runs:
        arguments_path = run.log_path.with_suffix(".json")
        arguments_path.write_text(json.dumps(dataclasses.asdict(run.arguments), indent=2))
        command = [sys.executable, "-m", run.module, str(arguments_path)]
        print(f"$ {' '.join(command)}", flush=True)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        relay = threading.Thread(target=_relay, daemon=True,
                                 args=(process.stdout, run.log_path, f"[{run.variant}] " if len(runs) > 1 else ""))
        relay.start()
        children.append((run, process, relay))
    seconds, failures, waiting = {}, [], list(children)
    while waiting:
        for child in list(waiting):
            run, process, relay = child
            if process.poll() is None:
                continue
            waiting.remove(child)
            relay.join()
            if process.returncode == 0:
                seconds[run.variant] = time.time() - started
            else:
                failures.append(f"{run.module} ({run.variant}) failed with exit code {process.returncode}; see "
                                f"{run.log_path}")
        time.sleep(0.1)
    return seconds, failures


def train_runs(runs: list[TrainingRun], jobs: int, threads: int | None) -> dict[str, float]:
    """Train each of `runs` unless its folder holds a finished run with its settings, `jobs` at a time; returns
    the wall-clock seconds of those that trained, by variant."""
    pending = []
    for run in runs:
        if run.reusable():
            print(f"reusing the {run.variant} {run.stage} in {run.folder} (pass --force to retrain)")
            continue
        run.folder.mkdir(parents=True, exist_ok=True)
        (run.folder / RUN_SETTINGS).unlink(missing_ok=True)
        pending.append(run)
    seconds = {}
    for start in range(0, len(pending), jobs):
        group = pending[start:start + jobs]
        trained, failures = _run_together(group, threads)
        for run in group:  # a run that finished is kept, and reused on a rerun, whatever its neighbour did
            if run.variant in trained:
                (run.folder / RUN_SETTINGS).write_text(json.dumps(run.settings))
        if failures:
            raise RuntimeError("; ".join(failures))
        seconds.update(trained)
    return seconds


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


def tokenizer_run(variant: str, budget: Budget, arguments: CompareArguments, dataset: str, seed: int, root: Path,
                  threads: int | None) -> TrainingRun:
    """One variant's tokenizer under `root`."""
    tokenizer_dir = root / "tokenizers" / variant
    stage1 = tokenizer_arguments(budget, variant, dataset, arguments.modality, seed, arguments.perceptual,
                                 tokenizer_dir, threads)
    return TrainingRun(variant, "tokenizer", "stage1_tokenizer.train", stage1, tokenizer_dir,
                       tokenizer_settings(stage1), "model.safetensors", root / f"train_tokenizer_{variant}.log",
                       arguments.force)


def prior_run(variant: str, budget: Budget, arguments: CompareArguments, dataset: str, class_conditional: bool,
              seed: int, root: Path, threads: int | None, retrain: bool = False) -> TrainingRun:
    """The prior on `root`'s `variant` tokenizer (always retrained with `retrain`: its tokenizer just was)."""
    tokenizer_dir, prior_dir = root / "tokenizers" / variant, root / "pipelines" / variant
    stage2 = prior_arguments(budget, tokenizer_dir, dataset, seed, class_conditional, prior_dir, threads)
    prior_settings = dict(dataclasses.asdict(stage2.resolved()),
                          tokenizer_weights_mtime=(tokenizer_dir / "model.safetensors").stat().st_mtime)
    return TrainingRun(variant, "prior", "stage2_prior.train", stage2, prior_dir, prior_settings,
                       "pipeline_config.json", root / f"train_prior_{variant}.log", arguments.force or retrain)


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


def job_threads(arguments: CompareArguments, jobs: int) -> int:
    """Threads for each of `jobs` training processes at once: their share of --threads, OMP_NUM_THREADS or the
    free cores."""
    return max(1, arguments.thread_total() // jobs)


def fitted_budget(arguments: CompareArguments, budget: Budget, dataset: str, num_classes: int,
                  output_dir: Path, jobs: int = 1) -> tuple[Budget, str | None]:
    """The budget with its steps fitted to `train_minutes` on this machine (pipelines/budget_fit.py), for its runs
    trained `jobs` at a time, and a line saying what was done. The fit is kept in output_dir/budget_fit.json, so a
    rerun reuses its runs."""
    if not budget.train_minutes:
        return budget, None
    explicit = _explicit_steps(arguments)
    if explicit:
        return budget, f"not fitted to {budget.train_minutes:g} min: {', '.join(explicit)} given explicitly"
    record = output_dir / "budget_fit.json"
    if record.is_file() and not arguments.force:
        saved = json.loads(record.read_text())
        if saved.get("budget") == dataclasses.asdict(budget) and saved.get("jobs", 1) == jobs:
            print(f"budget fit (from {record}): {saved['note']}")
            return Budget(**saved["fitted"]), saved["note"]
    from .budget_fit import describe_fit, fastest, fit_budget, probe_step_seconds

    print(f"timing a few training steps of each stage to fit the budget to {budget.train_minutes:g} min", flush=True)
    in_channels = input_channels(arguments, dataset)
    seconds = None
    meter = ThreadGovernor(max_threads=1)  # only its load measurement: what other processes took meanwhile
    for attempt in range(1, FIT_ATTEMPTS + 1):
        timed = probe_step_seconds(budget, arguments.modality, in_channels, num_classes, arguments.perceptual,
                                   together_threads=job_threads(arguments, jobs) if jobs == 2 else None)
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
                                  "note": note, "jobs": jobs, **info}, indent=2))
    return fitted, note


def refit_priors(arguments: CompareArguments, planned: Budget, budget: Budget, dataset: str, num_classes: int,
                 output_dir: Path, tokenizer_seconds: float | None, jobs: int = 1) -> tuple[Budget, str | None]:
    """The fitted `budget` with its priors' steps fitted again to what the time target has left after both
    tokenizers trained for `tokenizer_seconds` of wall-clock time (None: one or both were reused), the priors to
    train `jobs` at a time, and a line saying so.

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
    from .budget_fit import describe_refit, probe_prior_seconds, probe_together, refit_prior_steps

    start = time.time()
    in_channels = input_channels(arguments, dataset)
    if jobs == 2:  # both priors' steps side by side, as they will train; their compilation as the first fit timed it
        prior = max(probe_together(("prior", "prior"), budget, arguments.modality, in_channels, num_classes,
                                   arguments.perceptual, job_threads(arguments, jobs)))
        prior_compile = record.get("step_seconds", {}).get("prior_compile", 0.0)
    else:
        prior, prior_compile = probe_prior_seconds(budget, arguments.modality, in_channels, num_classes, steps=30)
    seconds_left = budget.train_minutes * 60 - tokenizer_seconds - (time.time() - start)
    refitted, info = refit_prior_steps(budget, planned.prior_steps, seconds_left, prior, prior_compile, jobs=jobs)
    note = describe_refit(info)
    print(f"budget fit: {note}", flush=True)
    record["prior_refit"] = {**info, "note": note}
    record_path.write_text(json.dumps(record, indent=2))
    return refitted, note


def run_compare(arguments: CompareArguments) -> CompareResult:
    """Train both variants for every seed, evaluate, judge, and write metrics.json and the report."""
    from .report import write_report

    set_torch_threads(arguments.threads)
    started = time.time()
    jobs = arguments.resolved_jobs()
    threads = job_threads(arguments, jobs) if arguments.threads or user_threads() else None
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
    budget, fit_note = fitted_budget(arguments, planned, dataset, num_classes, output_dir, jobs)
    side_by_side = " (side by side)" if jobs == 2 else ""
    seeds = arguments.seed_list
    runs = []
    for index, seed in enumerate(seeds):
        root = seed_folder(output_dir, index, seed)
        # Both tokenizers first: their minutes decide what the priors get.
        print(f"== seed {seed}: tokenizers{side_by_side} ({arguments.budget} budget) ==", flush=True)
        stage_start = time.time()
        tokenizers = train_runs([tokenizer_run(variant, budget, arguments, dataset, seed, root, threads)
                                 for variant in VARIANTS], jobs, threads)
        if index == 0:  # further seeds train their priors with the first seed's steps
            budget, refit_note = refit_priors(arguments, planned, budget, dataset, num_classes, output_dir,
                                              time.time() - stage_start if len(tokenizers) == len(VARIANTS) else None,
                                              jobs)
            if refit_note:
                fit_note = f"{fit_note}; {refit_note}"
        print(f"== seed {seed}: priors{side_by_side} ({arguments.budget} budget) ==", flush=True)
        priors = train_runs([prior_run(variant, budget, arguments, dataset, class_conditional, seed, root, threads,
                                       retrain=variant in tokenizers) for variant in VARIANTS], jobs, threads)
        timings = {variant: {**({"tokenizer_seconds": tokenizers[variant]} if variant in tokenizers else {}),
                             **({"prior_seconds": priors[variant]} if variant in priors else {})}
                   for variant in VARIANTS}
        print(f"== seed {seed}: evaluation ==", flush=True)
        run = evaluate_seed(root, budget, dataset, arguments.modality, seed)
        run["training"] = {v: t for v, t in timings.items() if t}
        runs.append(run)
    settings = dict(
        dataset=dataset, modality=arguments.modality, budget=arguments.budget, seeds=seeds,
        overrides=arguments.overrides(), class_conditional=class_conditional, jobs=jobs,
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
