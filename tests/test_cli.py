"""`vqgen sample` (and its error handling): in-process through main(), and twice as a real subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.cli import main
from pipelines.pipeline import VQPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub, use_local_hub  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) in-process -> (exit status, stdout, stderr)."""
    try:
        main(argv)
        status = 0
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_one_line_error(status: int, stderr: str, *needles: str) -> None:
    """Exit status 2, no traceback, and exactly one `error: ...` line (the last) that names what was wrong."""
    assert status == 2
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    for needle in needles:
        assert needle in errors[0]


def test_sample_writes_a_png(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "g.png"
    status, stdout, _ = _run_main(["sample", str(pipeline_dir), "--num-samples", "4", "--out", str(out),
                                   "--class-labels", "5", "--guidance-scale", "2.0", "--top-k", "20"], capsys)
    assert status == 0
    assert f"wrote {out}" in stdout
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.size == (2 * 16 + 3 * 2,) * 2


def test_sample_is_seeded(pipeline_dir, tmp_path, capsys):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, ("3", "3", "4")):
        assert _run_main(["sample", str(pipeline_dir), "--num-samples", "4", "--seed", seed, "--out", str(path)],
                         capsys)[0] == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--temperature", "0"], ["temperature"]),
        (["--class-labels", "10"], ["class_labels", "10"]),
        (["--num-samples", "2", "--class-labels", "0", "1", "2"], ["class_labels"]),
        (["--top-p", "1.5"], ["top_p"]),
        (["--guidance-scale", "-1"], ["guidance_scale"]),
    ],
)
def test_sample_bad_values(pipeline_dir, tmp_path, capsys, extra, needles):
    out = tmp_path / "never.png"
    status, _, stderr = _run_main(["sample", str(pipeline_dir), "--out", str(out), *extra], capsys)
    _assert_one_line_error(status, stderr, *needles)
    assert not out.exists()


def test_sample_missing_folder(tmp_path, capsys):
    status, _, stderr = _run_main(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")], capsys)
    _assert_one_line_error(status, stderr, "missing")


def test_sample_pickle_only_folder(pipeline_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(pipeline_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("checkpoints")))
    (folder / "prior" / "model.safetensors").rename(folder / "prior" / "pytorch_model.bin")
    status, _, stderr = _run_main(["sample", str(folder)], capsys)
    _assert_one_line_error(status, stderr, "pickle", "safetensors")


def test_sample_rejects_zero_samples_at_parse_time(pipeline_dir, capsys):
    status, _, stderr = _run_main(["sample", str(pipeline_dir), "--num-samples", "0"], capsys)
    assert status == 2 and "Traceback" not in stderr
    assert "--num-samples" in stderr and "must be an integer >= 1" in stderr


def _vqgen(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=120)


def test_subprocess_missing_folder(tmp_path, offline_env):
    result = _vqgen("sample", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g.png"), env=offline_env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # exactly one line
    assert result.stderr.startswith("error: ") and "nowhere" in result.stderr
    assert not (tmp_path / "g.png").exists()


def test_subprocess_sample(pipeline_dir, tmp_path, offline_env):
    out = tmp_path / "g.png"
    result = _vqgen("sample", str(pipeline_dir), "--num-samples", "4", "--out", str(out), "--class-labels", "1",
                    "2", "3", "4", env=offline_env)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    with Image.open(out) as grid:
        assert grid.format == "PNG"


def test_push_then_sample_from_the_hub(pipeline_dir, tmp_path, capsys):
    """`vqgen push` to the local Hub, then load by repo id into a fresh cache: identical samples."""
    with LocalHub() as hub, use_local_hub(hub, hf_home=tmp_path / "hf", token=None):
        repo_id = f"{hub.user}/cli-pushed"
        status, stdout, stderr = _run_main(["push", str(pipeline_dir), repo_id, "--token", hub.token], capsys)
        assert status == 0, stderr
        assert f"to {repo_id}" in stdout
        assert hub.repo_ids() == [repo_id]
        remote = VQPipeline.from_pretrained(repo_id, cache_dir=str(tmp_path / "fresh-cache"))
        out = tmp_path / "hub.png"
        assert _run_main(["sample", repo_id, "--num-samples", "4", "--out", str(out)], capsys)[0] == 0
        assert out.is_file()
        assert hub.unhandled == []
    local = VQPipeline.from_pretrained(pipeline_dir)
    kwargs = dict(num_samples=4, class_labels=[6, 7, 8, 9], guidance_scale=2.0, seed=4, output_type="pt")
    assert torch.equal(remote.generate(**kwargs).images, local.generate(**kwargs).images)


def test_push_without_token_is_a_one_line_error(pipeline_dir, tmp_path, capsys):
    with LocalHub() as hub, use_local_hub(hub, hf_home=tmp_path / "hf", token=None):
        status, _, stderr = _run_main(["push", str(pipeline_dir), f"{hub.user}/anonymous"], capsys)
        assert hub.repo_ids() == []
    _assert_one_line_error(status, stderr, "401")
