"""Threading policy on an idle and on a shared CPU: stage-1 training step time under three OpenMP settings.

Each run is a fresh `python -m stage1_tokenizer.train` process (OpenMP reads its settings when torch loads), and
the step time is the median of the run's logged `step_time` rows after the first. The settings:

- `spin`: one thread per core, fixed, with OpenMP's default spin-waiting (what vqgen ran with before);
- `passive`: the same with GOMP_SPINCOUNT=0 (waiting threads sleep at once);
- `vqgen`: vqgen's default, the thread governor (stage1_tokenizer/threads.py);
- `1 thread`: OMP_NUM_THREADS=1, the floor a shared machine should not fall far below.

"busy" runs them beside one pure-Python busy loop (nice 0 by default). Conditions and settings are interleaved.
Targets: vqgen idle within 5% of spin idle; vqgen busy at most 1.5x 1-thread busy.

    python benchmarks/bench_threads.py [--quick] [--preset tiny|small] [--neighbour-nice 19]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO_ROOT, RESULTS_DIR, environment, median, print_table, write_json

import torch  # noqa: E402

from stage1_tokenizer.threads import usable_cores  # noqa: E402

SETTINGS = {
    "spin": {"OMP_NUM_THREADS": "CORES"},
    "passive": {"OMP_NUM_THREADS": "CORES", "GOMP_SPINCOUNT": "0"},
    "vqgen": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
threads_used: dict[str, list[int]] = {setting: [] for setting in SETTINGS}  # thread count at each logged row
USER_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def train_step_time(args, setting: str, workdir: Path) -> float:
    """Median logged step time (s) of one fresh training process under a setting."""
    env = {k: v for k, v in os.environ.items() if k not in USER_VARIABLES}
    env.update({k: str(usable_cores()) if v == "CORES" else v for k, v in SETTINGS[setting].items()})
    out = workdir / f"run_{len(list(workdir.iterdir()))}"
    command = [sys.executable, "-m", "stage1_tokenizer.train", "--dataset", "digits", "--variant", args.variant,
               "--preset", args.preset, "--max-steps", str(args.steps), "--batch-size", "32",
               "--disc-start", "0", "--log-every", str(args.log_every), "--checkpoint-every", "100000",
               "--sample-every", "100000", "--max-eval-items", "32", "--output-dir", str(out)]
    subprocess.run(command, env=env, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    threads_used[setting].extend(row["threads"] for row in rows)
    return median([row["step_time"] for row in rows[1:]] or [rows[0]["step_time"]])


def start_neighbour(nice: int) -> subprocess.Popen:
    """One busy process: a pure-Python loop (the kind of neighbour any desktop has)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(nice))


def main(args: argparse.Namespace) -> None:
    env = environment(torch.device("cpu"))
    print(f"stage-1 {args.variant} `{args.preset}` training, batch 32, {args.steps} steps per run, {args.repeats} "
          f"interleaved repeat(s); busy = one busy loop at nice {args.neighbour_nice}; {env['cpu']}, "
          f"{env['cpu_count']} CPUs; load average {env['load_average_at_start']}", flush=True)
    times = {(c, s): [] for c in ("idle", "busy") for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for condition in ("idle", "busy"):
                neighbour = start_neighbour(args.neighbour_nice) if condition == "busy" else None
                try:
                    for setting in SETTINGS:
                        times[condition, setting].append(train_step_time(args, setting, Path(tmp)))
                        print(f"  {condition:4s} {setting:8s} {times[condition, setting][-1] * 1000:8.1f} ms/step, "
                              f"threads at the logged steps {threads_used[setting][-args.steps // args.log_every:]}",
                              flush=True)
                finally:
                    if neighbour is not None:
                        neighbour.kill()
                        neighbour.wait()
    step = {key: median(values) for key, values in times.items()}
    rows = [{"condition": c, "setting": s, "ms_per_step": step[c, s] * 1000,
             "vs_spin_idle": step[c, s] / step["idle", "spin"], "vs_1thread_same": step[c, s] / step[c, "1 thread"]}
            for c in ("idle", "busy") for s in SETTINGS]
    table = print_table("Step time by threading setting", [
        ("condition", "machine"), ("setting", "setting"), ("ms_per_step", "ms / step"),
        ("vs_spin_idle", "vs spin, idle"), ("vs_1thread_same", "vs 1 thread, same machine")], rows)
    idle_ratio = step["idle", "vqgen"] / step["idle", "spin"]
    busy_ratio = step["busy", "vqgen"] / step["busy", "1 thread"]
    print(f"\nvqgen idle / spin idle: {idle_ratio:.3f} (target <= 1.05): {'met' if idle_ratio <= 1.05 else 'NOT met'}")
    print(f"vqgen busy / 1 thread busy: {busy_ratio:.3f} (target <= 1.5): {'met' if busy_ratio <= 1.5 else 'NOT met'}")
    write_json(args.output or RESULTS_DIR / f"threads_{args.preset}.json", {
        "environment": env, "settings": {k: v or "vqgen default" for k, v in SETTINGS.items()},
        "step_seconds": {f"{c}/{s}": v for (c, s), v in times.items()}, "table": table,
        "idle_ratio": idle_ratio, "busy_ratio": busy_ratio})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 60 steps (default: 3 repeats of 120)")
    parser.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--variant", choices=("vqvae", "vqgan"), default="vqvae")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--neighbour-nice", type=int, default=0, help="niceness of the busy neighbour (0-19)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.steps = args.steps or (60 if args.quick else 120)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.log_every = max(1, args.steps // 4)
    return args


if __name__ == "__main__":
    main(parse_args())
