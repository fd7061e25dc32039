"""The in-memory Hub of ``tests/hub_server.py``, exercised with the real ``huggingface_hub`` client over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import HfApi, ModelHubMixin, constants, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub, hub_env, use_local_hub  # noqa: E402

REPO_ID = "test-user/tiny-model"


@pytest.fixture
def hub():
    with LocalHub() as server:
        yield server
        assert server.unhandled == [], f"client used endpoints LocalHub does not implement: {server.unhandled}"


def make_folder(root: Path, *, config: dict | None = None, weights: bytes | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or {"codebook_size": 16, "dim": 8}))
    (root / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- vqgen\n---\n# Tiny model\n")
    (root / "sub" / "nested").mkdir(parents=True, exist_ok=True)
    (root / "sub" / "nested" / "notes.txt").write_text("nested file\n")
    (root / "model.safetensors").write_bytes(weights if weights is not None else os.urandom(3 * 1024 * 1024))
    return root


def folder_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_folder_and_download_by_repo_id(hub, tmp_path):
    src = make_folder(tmp_path / "src")
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    url = api.create_repo(REPO_ID, private=False, exist_ok=True)
    assert url.repo_id == REPO_ID
    api.create_repo(REPO_ID, exist_ok=True)  # second call: 409 on the server, tolerated by exist_ok
    info = api.upload_folder(folder_path=src, repo_id=REPO_ID, commit_message="Add tiny model")
    assert hub.head(REPO_ID) == info.oid
    assert hub.commit_log(REPO_ID)[0]["title"] == "Add tiny model"

    # Everything travelled as regular base64 content in the NDJSON commit: no Git-LFS, no Xet.
    assert not [p for _, p in hub.requests if "lfs" in p or "xet" in p]
    assert hub.read_file(REPO_ID, "model.safetensors") == (src / "model.safetensors").read_bytes()

    expected = folder_files(src)
    assert sorted(api.list_repo_files(REPO_ID)) == sorted([*expected, ".gitattributes"])
    model = api.model_info(REPO_ID, files_metadata=True)
    assert model.id == REPO_ID and model.sha == info.oid and model.private is False
    sizes = {s.rfilename: s.size for s in model.siblings}
    assert sizes["model.safetensors"] == 3 * 1024 * 1024
    assert api.repo_info(REPO_ID).sha == info.oid
    top = {e.path for e in api.list_repo_tree(REPO_ID)}
    assert top == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub"}
    assert [e.path for e in api.get_paths_info(REPO_ID, ["sub", "config.json", "missing"])] == ["sub", "config.json"]
    assert api.file_exists(REPO_ID, "sub/nested/notes.txt") and not api.file_exists(REPO_ID, "nope.txt")

    cache = tmp_path / "fresh-cache"
    local = Path(snapshot_download(REPO_ID, revision=None, cache_dir=cache, endpoint=hub.endpoint))
    assert local.name == info.oid and local.is_relative_to(cache)
    downloaded = folder_files(local)
    assert downloaded.pop(".gitattributes")  # created with the repo, as on the Hub
    assert downloaded == expected

    one = hf_hub_download(REPO_ID, "sub/nested/notes.txt", cache_dir=tmp_path / "other", endpoint=hub.endpoint)
    assert Path(one).read_bytes() == expected["sub/nested/notes.txt"]


def test_new_commit_is_served_and_old_sha_keeps_old_content(hub, tmp_path):
    weights = os.urandom(1024 * 1024)
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo(REPO_ID)
    first = api.upload_folder(folder_path=make_folder(tmp_path / "v1", weights=weights), repo_id=REPO_ID).oid
    v2 = make_folder(tmp_path / "v2", config={"codebook_size": 32, "dim": 8}, weights=weights)
    second = api.upload_folder(folder_path=v2, repo_id=REPO_ID, commit_message="Bigger codebook").oid
    assert first != second
    # The client skipped unchanged files, thanks to the oids returned by preupload.
    assert hub.commit_log(REPO_ID)[0]["changed"] == ["config.json"]

    new = Path(snapshot_download(REPO_ID, cache_dir=tmp_path / "c1", endpoint=hub.endpoint))
    assert new.name == second
    assert json.loads((new / "config.json").read_text())["codebook_size"] == 32
    old = Path(snapshot_download(REPO_ID, revision=first, cache_dir=tmp_path / "c2", endpoint=hub.endpoint))
    assert old.name == first
    assert json.loads((old / "config.json").read_text())["codebook_size"] == 16
    assert (old / "model.safetensors").read_bytes() == weights
    old_file = hf_hub_download(REPO_ID, "config.json", revision=first, cache_dir=tmp_path / "c3", endpoint=hub.endpoint)
    assert json.loads(Path(old_file).read_text())["codebook_size"] == 16
    assert api.model_info(REPO_ID, revision=first).sha == first

    # Branches and tags resolve too.
    api.create_tag(REPO_ID, tag="v1", revision=first)
    api.create_branch(REPO_ID, branch="dev", revision=first)
    assert api.model_info(REPO_ID, revision="v1").sha == first
    assert [b.name for b in api.list_repo_refs(REPO_ID).branches] == ["main", "dev"]
    assert [c.commit_id for c in api.list_repo_commits(REPO_ID)][:2] == [second, first]


def test_missing_repo_file_and_revision_raise_client_errors(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("nobody/missing", cache_dir=tmp_path / "c", endpoint=hub.endpoint)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("nobody/missing", cache_dir=tmp_path / "c", endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/missing", "config.json", cache_dir=tmp_path / "c", endpoint=hub.endpoint)

    hub.commit_files(REPO_ID, {"config.json": b"{}"})
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "nope.bin", cache_dir=tmp_path / "c", endpoint=hub.endpoint)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO_ID, revision="no-such-branch", cache_dir=tmp_path / "c", endpoint=hub.endpoint)


def test_push_without_token_is_rejected(hub, tmp_path):
    src = make_folder(tmp_path / "src", weights=b"\x00" * 10)
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_repo(REPO_ID)
    assert err.value.response.status_code == 401
    assert hub.repo_ids() == []

    HfApi(endpoint=hub.endpoint, token=hub.token).create_repo(REPO_ID)
    before = hub.head(REPO_ID)
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.upload_folder(folder_path=src, repo_id=REPO_ID)
    assert err.value.response.status_code == 401
    assert hub.head(REPO_ID) == before


def test_private_repo_needs_a_token_to_read(hub, tmp_path):
    HfApi(endpoint=hub.endpoint, token=hub.token).create_repo(REPO_ID, private=True)
    hub.commit_files(REPO_ID, {"config.json": b"{}"})
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO_ID)
    assert HfApi(endpoint=hub.endpoint, token=hub.token).model_info(REPO_ID).private is True
    local = snapshot_download(REPO_ID, cache_dir=tmp_path / "c", endpoint=hub.endpoint, token=hub.token)
    assert (Path(local) / "config.json").read_bytes() == b"{}"


def test_dataset_repo_and_restricted_tokens(tmp_path):
    with LocalHub(tokens={"good-token"}) as hub:
        with pytest.raises(HfHubHTTPError) as err:
            HfApi(endpoint=hub.endpoint, token="bad-token").create_repo("test-user/ds", repo_type="dataset")
        assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)
        api = HfApi(endpoint=hub.endpoint, token="good-token")
        api.create_repo("test-user/ds", repo_type="dataset")
        api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id="test-user/ds",
                        repo_type="dataset")
        local = snapshot_download("test-user/ds", repo_type="dataset", cache_dir=tmp_path / "c", endpoint=hub.endpoint)
        assert (Path(local) / "data" / "train.csv").read_bytes() == b"a,b\n1,2\n"
        assert api.dataset_info("test-user/ds").sha == hub.head("test-user/ds", repo_type="dataset")
        assert hub.unhandled == []


class TinyPipeline(ModelHubMixin):
    """Stands in for ``VQPipeline``: ``push_to_hub`` / ``from_pretrained`` relying on the client's defaults."""

    def __init__(self, payload: bytes = b""):
        self.payload = payload

    def _save_pretrained(self, save_directory: Path) -> None:
        (save_directory / "weights.bin").write_bytes(self.payload)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token, **kw):
        folder = snapshot_download(model_id, revision=revision, cache_dir=cache_dir, token=token)
        return cls((Path(folder) / "weights.bin").read_bytes())


def test_in_process_client_defaults_point_at_local_hub(hub, tmp_path):
    original = (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT"))
    payload = os.urandom(512 * 1024)
    with use_local_hub(hub, hf_home=tmp_path / "hf"):
        assert os.environ["HF_ENDPOINT"] == hub.endpoint
        TinyPipeline(payload).push_to_hub("test-user/pipe", token=hub.token)
        huggingface_hub.upload_file(path_or_fileobj=b"extra", path_in_repo="extra.txt", repo_id="test-user/pipe")
        loaded = TinyPipeline.from_pretrained("test-user/pipe")
        assert loaded.payload == payload
        assert huggingface_hub.model_info("test-user/pipe").sha == hub.head("test-user/pipe")
        assert (tmp_path / "hf" / "hub" / "models--test-user--pipe" / "snapshots").is_dir()
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT")) == original
    assert hub.list_files("test-user/pipe") == [".gitattributes", "README.md", "extra.txt", "weights.bin"]


def test_subprocess_uses_hub_env(hub, tmp_path):
    hub.commit_files(REPO_ID, {"config.json": b'{"dim": 8}', "sub/w.bin": os.urandom(2048)})
    code = textwrap.dedent(
        f"""
        from huggingface_hub import HfApi, snapshot_download
        HfApi().upload_file(path_or_fileobj=b"pushed", path_in_repo="from_child.txt", repo_id={REPO_ID!r})
        print(snapshot_download({REPO_ID!r}))
        """
    )
    env = {**os.environ, **hub_env(hub, hf_home=tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    local = Path(result.stdout.strip().splitlines()[-1])
    assert local.is_relative_to(tmp_path / "hf" / "hub") and local.name == hub.head(REPO_ID)
    assert (local / "from_child.txt").read_bytes() == b"pushed"
    assert (local / "sub" / "w.bin").read_bytes() == hub.read_file(REPO_ID, "sub/w.bin")
