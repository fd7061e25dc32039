"""Bad situations around a training run: an unusable --output-dir, two runs into one folder (the lock),
Ctrl-C / SIGTERM (checkpoint, one line, exit 130 / 143, resume), errors under `accelerate launch`, and
run_cli's one-line errors that keep real bugs' tracebacks."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stage1_tokenizer.train import cli as stage1_cli
from stage1_tokenizer.train_utils import (
    OutputDirError,
    OutputLock,
    list_checkpoints,
    run_cli,
    verify_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--variant", "vqvae", "--preset", "tiny", "--batch-size", "8", "--max-eval-items", "16"]


@pytest.fixture
def train(fresh_accelerate_state):
    """train(output_dir, *argv, steps=2): the stage-1 command line, in this process."""

    def run(output_dir: Path, *argv: str, steps: int = 2) -> Path:
        fresh_accelerate_state()
        stage1_cli([*TINY, "--max-steps", str(steps), "--output-dir", str(output_dir), *map(str, argv)])
        return output_dir

    return run


def one_line_error(capsys, stop, code: int = 2) -> str:
    """The single line a failed run printed (progress bars aside), after checking the exit status."""
    err = capsys.readouterr().err
    assert stop.value.code == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\||examples/s|it/s\]", line)]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------ --output-dir checks
@pytest.fixture
def not_writable(tmp_path):
    """A folder this process cannot write in: chmod 555, or (as root, whom modes do not stop) chattr +i."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode == 0
        if not immutable:
            folder.chmod(0o755)
            pytest.skip("cannot make a folder read-only here (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_output_dir_that_is_a_file_is_refused_before_any_work(train, tmp_path, capsys, monkeypatch):
    target = tmp_path / "results.txt"
    target.write_text("earlier results")
    monkeypatch.setattr("stage1_tokenizer.train.load_split", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(SystemExit) as stop:
        train(target)
    line = one_line_error(capsys, stop)
    assert line == f"error: --output-dir {str(target)!r} is an existing file, not a folder; choose another path"
    assert target.read_text() == "earlier results"


def test_output_dir_under_a_file_is_refused(train, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as stop:
        train(tmp_path / "file" / "run")
    line = one_line_error(capsys, stop)
    assert line == (f"error: --output-dir {str(tmp_path / 'file' / 'run')!r} cannot be created: {tmp_path / 'file'} "
                    "is a file, not a folder")


def test_read_only_output_dir_is_refused_before_any_step(train, not_writable, capsys, monkeypatch):
    monkeypatch.setattr("stage1_tokenizer.train.load_split", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(SystemExit) as stop:
        train(not_writable)
    line = one_line_error(capsys, stop)
    assert line.startswith(f"error: --output-dir {str(not_writable)!r} is not writable: ")
    assert line.endswith("fix its permissions or choose another folder")


def test_output_dir_that_cannot_be_created_is_refused(train, not_writable, capsys):
    with pytest.raises(SystemExit) as stop:
        train(not_writable / "run")
    assert one_line_error(capsys, stop).startswith(f"error: --output-dir {str(not_writable / 'run')!r} cannot be created (")


def test_stage2_output_dir_that_is_a_file_is_refused(pipeline_tokenizer_dir, tmp_path, capsys, fresh_accelerate_state):
    from stage2_prior.train import cli

    target = tmp_path / "pipeline"
    target.write_text("not a folder")
    with pytest.raises(SystemExit) as stop:
        cli(["--tokenizer", str(pipeline_tokenizer_dir), "--dataset", "digits", "--preset", "tiny", "--max-steps", "2",
             "--output-dir", str(target)])
    assert "is an existing file, not a folder" in one_line_error(capsys, stop)


# ------------------------------------------------------------------------------------------------- the lock
def write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / OutputLock.NAME
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2024-01-01 00:00:00"}))
    return lock


@pytest.fixture
def live_process():
    """A process that runs for the test's duration (it stands for another training run)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def test_a_folder_locked_by_a_running_process_is_refused(train, tmp_path, capsys, live_process):
    out = tmp_path / "run"
    lock = write_lock(out, live_process.pid)
    before = lock.read_text()
    with pytest.raises(SystemExit) as stop:
        train(out)
    line = one_line_error(capsys, stop)
    assert line.startswith(f"error: --output-dir {str(out)!r} is in use by another training run "
                           f"(process {live_process.pid}, started 2024-01-01 00:00:00)")
    assert lock.read_text() == before  # the other run's lock is left alone
    assert not (out / "metrics.jsonl").exists()


def test_a_lock_from_another_host_is_refused(train, tmp_path, capsys):
    out = tmp_path / "run"
    write_lock(out, 4242, host="elsewhere")
    with pytest.raises(SystemExit) as stop:
        train(out)
    assert one_line_error(capsys, stop) == (
        f"error: --output-dir {str(out)!r} is in use by training process 4242 on host 'elsewhere'; wait for it, "
        f"or delete {out / '.lock'} if that run is gone")


def test_a_stale_lock_is_taken_over_with_a_warning(train, tmp_path, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)
    dead_pid = int(finished.stdout)
    out = write_lock(tmp_path / "run", dead_pid).parent
    train(out)
    err = capsys.readouterr().err
    assert (f"warning: taking over the stale lock {out / '.lock'} of process {dead_pid}, which is no longer running"
            in err)
    assert (out / "model.safetensors").is_file()
    assert not (out / ".lock").exists()  # released at the end


def test_the_lock_is_released_when_the_run_fails(train, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train(out, "--dataset", str(tmp_path / "missing"))
    assert "does not exist" in capsys.readouterr().err
    assert out.is_dir() and not (out / ".lock").exists()


def test_output_lock_is_exclusive_and_released_on_exceptions(tmp_path):
    with OutputLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputDirError, match=rf"is in use by another training run \(process {os.getpid()}"):
            OutputLock(tmp_path).__enter__()
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(RuntimeError), OutputLock(tmp_path):
        raise RuntimeError("a crash inside the run")
    assert not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------------------------- Ctrl-C / SIGTERM
def send_signal_at_step(monkeypatch, module: str, step: int, signum: int = signal.SIGINT, times: int = 1) -> None:
    """Deliver `signum` to this process during training step `step` (from the per-step thread rebalancer)."""
    calls = {"count": 0}
    if signal.getsignal(signum) is signal.SIG_IGN:
        # A background job (`pytest &`, nohup) inherits SIGINT ignored, and training rightly keeps it ignored; the
        # test stands in for a user at a terminal, where Ctrl-C is live.
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def rebalance() -> None:
        calls["count"] += 1
        if calls["count"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(f"{module}.rebalance_threads", rebalance)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(train, tmp_path, capsys, monkeypatch, signum, code):
    out = tmp_path / "run"
    send_signal_at_step(monkeypatch, "stage1_tokenizer.train", 3, signum)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as stop:
        train(out, "--checkpoint-every", 100, steps=50)
    name = signal.Signals(signum).name
    assert one_line_error(capsys, stop, code) == (
        f"interrupted ({name}) at step 3: saved {out / 'checkpoints' / 'step_3'}; to continue, rerun the same command "
        "with --resume")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_3"]
    assert verify_checkpoint(out / "checkpoints" / "step_3") is None
    assert not (out / "model.safetensors").exists() and not (out / ".lock").exists()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # this process's handlers are back

    monkeypatch.undo()
    train(out, "--resume", steps=5)
    assert "resumed from step 3" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 5


def test_interrupt_right_after_a_checkpoint_does_not_save_it_twice(train, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    send_signal_at_step(monkeypatch, "stage1_tokenizer.train", 2)
    saved = []
    import stage1_tokenizer.train_utils as utils

    original = utils.save_checkpoint
    monkeypatch.setattr(utils, "save_checkpoint", lambda *a, **k: saved.append(a[2]) or original(*a, **k))
    monkeypatch.setattr("stage1_tokenizer.train.save_checkpoint", utils.save_checkpoint)
    with pytest.raises(SystemExit) as stop:
        train(out, "--checkpoint-every", 2, steps=50)
    assert "at step 2: saved" in one_line_error(capsys, stop, 130)
    assert saved == [2]


def test_a_second_ctrl_c_stops_at_once(train, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    send_signal_at_step(monkeypatch, "stage1_tokenizer.train", 3, times=2)
    with pytest.raises(SystemExit) as stop:
        train(out, "--checkpoint-every", 2, steps=50)
    assert one_line_error(capsys, stop, 130) == (
        f"interrupted; the newest checkpoint is {out / 'checkpoints' / 'step_2'}: rerun the same command with --resume "
        "to continue from it")
    assert not (out / ".lock").exists()


def test_stage2_interrupt_saves_a_checkpoint(pipeline_tokenizer_dir, code_cache_dir, tmp_path, capsys, monkeypatch,
                                             fresh_accelerate_state):
    from stage2_prior.train import cli

    out = tmp_path / "pipeline"
    argv = ["--tokenizer", str(pipeline_tokenizer_dir), "--dataset", "digits", "--preset", "tiny", "--batch-size", "16",
            "--cache-dir", str(code_cache_dir), "--max-eval-items", "32", "--output-dir", str(out)]
    send_signal_at_step(monkeypatch, "stage2_prior.train", 2)
    with pytest.raises(SystemExit) as stop:
        cli([*argv, "--max-steps", "40"])
    assert one_line_error(capsys, stop, 130) == (
        f"interrupted (SIGINT) at step 2: saved {out / 'checkpoints' / 'step_2'}; to continue, rerun the same command "
        "with --resume")
    assert verify_checkpoint(out / "checkpoints" / "step_2") is None and not (out / ".lock").exists()


def test_a_failed_resave_keeps_the_checkpoint_it_replaces(tmp_path, fresh_accelerate_state, monkeypatch):
    """Re-saving a step (a resumed run that did nothing) used to delete the old folder before the new one was in place."""
    import torch
    from accelerate import Accelerator

    import stage1_tokenizer.train_utils as utils

    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    checkpoints = tmp_path / "checkpoints"
    good = utils.save_checkpoint(accelerator, checkpoints, 2, keep=1)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(source).name.startswith(".tmp-"):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(utils.os, "replace", failing_replace)
    with pytest.raises(OSError):
        utils.save_checkpoint(accelerator, checkpoints, 2, keep=1)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert verify_checkpoint(good) is None


# --------------------------------------------------------------------------- a second run beside a running one
@pytest.mark.timeout(600)
def test_a_concurrent_run_is_refused_and_ctrl_c_on_the_first_resumes(train, tmp_path, capsys, offline_env):
    """A real second training into a busy folder, then a real SIGINT to the first (a subprocess), then --resume."""
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    command = [sys.executable, "-m", "stage1_tokenizer.train", *TINY, "--max-steps", "100000", "--log-every", "1",
               "--checkpoint-every", "100000", "--output-dir", str(out)]
    with open(log, "w") as stderr:
        # Ctrl-C live in the child even when pytest runs as a background job (which ignores SIGINT).
        first = subprocess.Popen(command, cwd=REPO_ROOT, env=offline_env, stdout=subprocess.DEVNULL, stderr=stderr,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while first.poll() is None and time.time() < deadline:
            if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        assert first.poll() is None, log.read_text()[-3000:]

        with pytest.raises(SystemExit) as stop:
            train(out)
        assert f"is in use by another training run (process {first.pid}," in one_line_error(capsys, stop)

        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
    finally:
        first.kill()
        first.wait()
    err = log.read_text()
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    step = int(re.fullmatch(r"interrupted \(SIGINT\) at step (\d+): saved (.+); to continue, rerun the same command "
                            r"with --resume", last).group(1))
    assert verify_checkpoint(out / "checkpoints" / f"step_{step}") is None
    assert not (out / ".lock").exists()

    train(out, "--resume", steps=step + 2)
    assert f"resumed from step {step}" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- one-line errors
def test_our_value_errors_are_one_line_and_library_ones_keep_their_traceback(capsys):
    from stage1_tokenizer.data import load_split

    with pytest.raises(SystemExit) as stop:
        run_cli(lambda args: load_split("digits", "bogus"), None)
    assert one_line_error(capsys, stop) == "error: split='bogus'; expected 'train' or 'eval'"
    # A ValueError raised inside a library is a bug until proven otherwise: its traceback is kept.
    with pytest.raises(json.JSONDecodeError):
        run_cli(lambda args: json.loads("{"), None)


def test_accelerate_launch_quiet_shows_only_our_line(tmp_path, offline_env):
    """`accelerate launch` adds its own CalledProcessError traceback after ours unless given -q."""
    target = tmp_path / "a-file"
    target.write_text("x")
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "stage1_tokenizer.train", *TINY, "--max-steps", "2", "--output-dir", str(target)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=offline_env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 1  # accelerate's status for any failure of the script
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --output-dir {str(target)!r} is an existing file, not a folder; choose another path"]
