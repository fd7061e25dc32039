"""VQPipeline: save/load, generate() input checks and outputs, safe loading, model card, pipeline_config.json."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stage2_prior.model_card import write_model_card
from pipelines.pipeline import VQPipeline
from stage1_tokenizer.configuration import VQConfig
from stage1_tokenizer.modeling import VQModel
from stage2_prior.modeling import TokenLayout, build_prior

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub, use_local_hub  # noqa: E402


@pytest.fixture(scope="module")
def pipe(pipeline_dir) -> VQPipeline:
    """The session's trained class-conditional pipeline (10 digit classes)."""
    return VQPipeline.from_pretrained(pipeline_dir)


@pytest.fixture(scope="module")
def unconditional_pipe(pipeline_tokenizer_dir) -> VQPipeline:
    """The same tokenizer with a fresh, unconditional tiny prior."""
    tokenizer = VQModel.from_pretrained(pipeline_tokenizer_dir)
    layout = TokenLayout(tokenizer.config.codebook_size, 0, int(np.prod(tokenizer.config.latent_shape)))
    return VQPipeline(tokenizer, build_prior("tiny", layout), layout=layout, metadata={"dataset": "digits"})


@pytest.fixture
def pipeline_copy(pipeline_dir, tmp_path) -> Path:
    """A writable copy of the session's pipeline folder (without its training checkpoints)."""
    return Path(shutil.copytree(pipeline_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("checkpoints")))


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    loaded = VQPipeline.from_pretrained(tmp_path / "saved")
    assert _state_equal(loaded.tokenizer, pipe.tokenizer)
    assert _state_equal(loaded.prior, pipe.prior)
    assert loaded.layout == pipe.layout and loaded.class_names == pipe.class_names
    assert loaded.metadata == pipe.metadata
    kwargs = dict(num_samples=4, class_labels=[1, 2, 3, 4], guidance_scale=1.5, seed=11, output_type="pt")
    before, after = pipe.generate(**kwargs), loaded.generate(**kwargs)
    assert torch.equal(before.codes, after.codes)
    assert torch.equal(before.images, after.images)


def test_save_pretrained_only_serialises(pipe, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("save_pretrained ran the model")

    fresh = VQPipeline(pipe.tokenizer, pipe.prior, pipe.layout, pipe.class_names, pipe.metadata)
    monkeypatch.setattr(fresh, "generate", refuse)
    monkeypatch.setattr("stage2_prior.sampling.sample_codes", refuse)
    fresh.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "sample_grid.png").exists()
    grid = Image.new("RGB", (20, 10))
    fresh.save_pretrained(tmp_path / "with_grid", sample_grid=grid)
    assert (tmp_path / "with_grid" / "sample_grid.png").is_file()
    assert "![samples](sample_grid.png)" in (tmp_path / "with_grid" / "README.md").read_text()


def test_unconditional_save_load_round_trip(unconditional_pipe, tmp_path):
    unconditional_pipe.save_pretrained(tmp_path / "uncond")
    loaded = VQPipeline.from_pretrained(tmp_path / "uncond")
    assert not loaded.layout.conditional and loaded.class_names is None
    before, after = unconditional_pipe.generate(num_samples=2, seed=3), loaded.generate(num_samples=2, seed=3)
    assert torch.equal(before.codes, after.codes)


# --------------------------------------------------------------------------------------- generate()
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(temperature=0), "temperature"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(batch_size=0), "batch_size"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(num_samples=2, class_labels=[0, 10]), "class_labels"),
        (dict(num_samples=1, class_labels=[-1]), "class_labels"),
        (dict(num_samples=3, class_labels=[0, 1]), "class_labels"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=True), "top_k"),
        (dict(top_p=True), "top_p"),
        (dict(class_labels=[1.9, 2.7]), "class_labels"),  # not silently truncated to 1, 2
        (dict(class_labels=["cat", "dog"]), "class_labels"),
        (dict(num_samples=10**12), "num_samples"),  # refused before any allocation
        (dict(seed=2**70), "seed"),
        (dict(seed=-1), "seed"),
    ],
)
def test_generate_rejects_bad_arguments(pipe, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        pipe.generate(**{"num_samples": 2, **kwargs})


@pytest.mark.parametrize("kwargs, argument", [(dict(class_labels=[0, 1]), "class_labels"),
                                               (dict(guidance_scale=2.0), "guidance_scale")])
def test_unconditional_prior_rejects_conditioning(unconditional_pipe, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        unconditional_pipe.generate(num_samples=2, **kwargs)


def test_output_types(pipe):
    kwargs = dict(num_samples=3, class_labels=[7, 7, 7], seed=2)
    pil, pt, arr = (pipe.generate(**kwargs, output_type=t) for t in ("pil", "pt", "np"))
    assert torch.equal(pil.codes, pt.codes) and pt.codes.shape == (3, 8, 8)
    assert pt.images.shape == (3, 1, 16, 16) and pt.images.dtype == torch.float32
    assert 0.0 <= pt.images.min() and pt.images.max() <= 1.0
    assert isinstance(arr.images, np.ndarray) and arr.images.shape == (3, 16, 16, 1)
    assert 0.0 <= arr.images.min() and arr.images.max() <= 1.0
    assert len(pil.images) == 3 and all(isinstance(im, Image.Image) for im in pil.images)
    assert {(im.size, im.mode) for im in pil.images} == {((16, 16), "L")}
    as_bytes = (pt.images[:, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(np.stack([np.asarray(im) for im in pil.images]), as_bytes)
    assert np.allclose(arr.images[..., 0], pt.images[:, 0].numpy())


def test_generate_in_batches(pipe):
    kwargs = dict(num_samples=4, class_labels=3, seed=9, output_type="pt", batch_size=3)
    batched, again = pipe.generate(**kwargs), pipe.generate(**kwargs)
    assert batched.class_labels == [3, 3, 3, 3]
    assert batched.codes.shape == (4, 8, 8) and batched.images.shape == (4, 1, 16, 16)
    assert torch.equal(batched.codes, again.codes)


def test_grid_and_save(pipe, tmp_path):
    out = pipe.generate(num_samples=4, class_labels=[0, 1, 2, 3], seed=0)
    path = out.save(tmp_path / "grid.png", nrow=2)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)


# --------------------------------------------------------------------------------------- safe loading
class _Payload:
    """Unpickling this touches `marker` (what a malicious checkpoint could do instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("component", ["prior", "tokenizer"])
def test_pickle_only_weights_are_refused_unopened(pipeline_copy, tmp_path, component):
    marker = tmp_path / "unpickled.marker"
    folder = pipeline_copy / component
    (folder / "model.safetensors").unlink()
    torch.save({"weights": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle") as error:
        VQPipeline.from_pretrained(pipeline_copy)
    assert "safetensors" in str(error.value)
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the payload is live: loading it would run it
    assert marker.exists()


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VQPipeline.from_pretrained(tmp_path / "no-such-pipeline")


def test_missing_pipeline_config_is_a_clear_error(pipeline_copy):
    (pipeline_copy / "pipeline_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="pipeline_config.json"):
        VQPipeline.from_pretrained(pipeline_copy)


def test_missing_component_folder_is_a_clear_error(pipeline_copy):
    shutil.rmtree(pipeline_copy / "prior")
    with pytest.raises(FileNotFoundError, match="prior"):
        VQPipeline.from_pretrained(pipeline_copy)


@pytest.mark.parametrize("component", ["prior", "tokenizer"])
@pytest.mark.parametrize("keep", [0.5, 0.0001], ids=["half", "header"])
def test_truncated_safetensors_is_a_clear_error(pipeline_copy, component, keep):
    weights = pipeline_copy / component / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(ValueError, match=rf"{component} weights .* truncated or corrupt"):
        VQPipeline.from_pretrained(pipeline_copy)


def test_weights_that_do_not_fit_their_config_are_a_clear_error(pipeline_copy):
    config_path = pipeline_copy / "tokenizer" / "config.json"
    fields = json.loads(config_path.read_text())
    fields["codebook_size"] //= 2  # the saved codebook keeps its old number of rows
    config_path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="tokenizer weights .* do not fit the shapes its config.json describes"):
        VQPipeline.from_pretrained(pipeline_copy)


def test_out_of_range_labels_are_named_once(pipe):
    with pytest.raises(ValueError, match=r"class_labels \[10, 12\] out of range: this prior knows classes 0\.\.9"):
        pipe.generate(num_samples=5, class_labels=[12, 0, 10, 12, 10])


def test_invalid_pipeline_config_json_is_a_clear_error(pipeline_copy):
    (pipeline_copy / "pipeline_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        VQPipeline.from_pretrained(pipeline_copy)


def test_tokenizer_codebook_mismatch_is_refused_at_load(pipeline_copy):
    saved = VQConfig.from_pretrained(pipeline_copy / "tokenizer")
    assert saved.codebook_size == 64
    config = VQConfig.from_preset("tiny", codebook_size=32)
    assert tuple(config.latent_shape) == tuple(saved.latent_shape)
    shutil.rmtree(pipeline_copy / "tokenizer")
    VQModel(config).save_pretrained(pipeline_copy / "tokenizer")
    with pytest.raises(ValueError, match="codebook"):
        VQPipeline.from_pretrained(pipeline_copy)


# --------------------------------------------------------------------------------------- folder contents
def test_model_card(pipeline_dir):
    from huggingface_hub import ModelCard

    text = (pipeline_dir / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    card = ModelCard.load(pipeline_dir / "README.md")
    assert card.data.library_name == "vqgen"
    assert "vqvae" in card.data.tags and "vqgen" in card.data.tags
    assert "`digits`" in card.text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    assert images == ["sample_grid.png"]
    with Image.open(pipeline_dir / images[0]) as grid:
        assert grid.format == "PNG" and grid.size[0] > 16 * 8
    assert "val_bits_per_code" in card.text


def test_model_card_lists_a_hub_dataset(pipe, tmp_path):
    from huggingface_hub import ModelCard

    hub_trained = VQPipeline(pipe.tokenizer, pipe.prior, pipe.layout, pipe.class_names,
                             metadata={**pipe.metadata, "dataset": "someone/fashion"})
    write_model_card(tmp_path, hub_trained.tokenizer.config, hub_trained.layout, hub_trained.class_names,
                     hub_trained.metadata)

    assert ModelCard.load(tmp_path / "README.md").data.datasets == ["someone/fashion"]
    assert "sample_grid.png" not in (tmp_path / "README.md").read_text()  # no grid in this folder: no image link


def test_pipeline_config_contents(pipeline_dir, pipe):
    config = json.loads((pipeline_dir / "pipeline_config.json").read_text())
    assert config["modality"] == "image"
    assert config["tokenizer_variant"] == "vqvae"
    assert config["class_names"] == [str(i) for i in range(10)]
    assert config["token_layout"] == pipe.layout.to_dict()
    prior_config = json.loads((pipeline_dir / "prior" / "config.json").read_text())
    assert config["token_layout"]["vocab_size"] == prior_config["vocab_size"]
    assert config["latent_shape"] == [8, 8]
    versions = config["library_versions"]
    for package in ("torch", "transformers", "safetensors", "huggingface_hub"):
        assert versions[package] == importlib.metadata.version(package)


# ------------------------------------------------------------------- Hub (local server, real client)
@pytest.fixture
def local_hub(tmp_path):
    """tests/hub_server.py's LocalHub, with this process's huggingface_hub pointed at it (HF_HOME in tmp_path)."""
    with LocalHub() as hub, use_local_hub(hub, hf_home=tmp_path / "hf"):
        yield hub
        assert hub.unhandled == [], f"endpoints LocalHub does not implement: {hub.unhandled}"


def test_push_to_hub_and_load_back(pipe, local_hub, tmp_path):
    repo_id = f"{local_hub.user}/tiny-digits"
    pipe.push_to_hub(repo_id, token=local_hub.token)
    from huggingface_hub import HfApi

    files = set(HfApi().list_repo_files(repo_id))
    assert {"pipeline_config.json", "README.md", "sample_grid.png", "tokenizer/config.json",
            "tokenizer/model.safetensors", "prior/config.json", "prior/model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl")) or f.startswith("checkpoints/")]

    fresh_cache = tmp_path / "fresh-cache"
    loaded = VQPipeline.from_pretrained(repo_id, cache_dir=str(fresh_cache))
    assert any(fresh_cache.rglob("model.safetensors"))
    assert _state_equal(loaded.prior, pipe.prior) and _state_equal(loaded.tokenizer, pipe.tokenizer)
    kwargs = dict(num_samples=4, class_labels=[0, 1, 2, 3], guidance_scale=2.0, seed=1, output_type="pt")
    assert torch.equal(loaded.generate(**kwargs).images, pipe.generate(**kwargs).images)


def test_push_to_hub_needs_a_token(pipe, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    with LocalHub() as hub, use_local_hub(hub, hf_home=tmp_path / "hf", token=None):
        with pytest.raises(HfHubHTTPError):
            pipe.push_to_hub(f"{hub.user}/anonymous")
        assert hub.repo_ids() == []


def test_unknown_repo_is_a_clear_error(local_hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local pipeline folder and could not be downloaded"):
        VQPipeline.from_pretrained(f"{local_hub.user}/no-such-pipeline", cache_dir=str(tmp_path / "cache"))


def test_save_metadata_puts_evaluation_metrics_in_the_card(pipeline_copy):
    pipe = VQPipeline.from_pretrained(pipeline_copy)
    weights = (pipeline_copy / "prior" / "model.safetensors").read_bytes()
    pipe.metadata["evaluation_metrics"] = {"generation": {"fd_classifier": 12.5, "class_accuracy": 0.75}}
    pipe.save_metadata(pipeline_copy)
    card = (pipeline_copy / "README.md").read_text()
    assert "| evaluation / generation | fd_classifier | 12.5 |" in card
    assert "| evaluation / generation | class_accuracy | 0.75 |" in card
    reloaded = VQPipeline.from_pretrained(pipeline_copy)
    assert reloaded.metadata["evaluation_metrics"]["generation"]["fd_classifier"] == 12.5
    assert (pipeline_copy / "prior" / "model.safetensors").read_bytes() == weights  # weights untouched


@pytest.mark.parametrize("component, prefix", [("tokenizer", "decoder.up."), ("prior", "model.layers.0.mlp.")])
def test_weights_with_missing_tensors_are_refused(pipeline_copy, component, prefix):
    from safetensors.torch import load_file, save_file

    path = pipeline_copy / component / "model.safetensors"
    tensors = load_file(path)
    dropped = [k for k in tensors if k.startswith(prefix)]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{component} weights .* do not match its config.json \(missing: "):
        VQPipeline.from_pretrained(pipeline_copy)
