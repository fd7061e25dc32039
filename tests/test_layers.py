"""The flow runs one way: stage 1 <- stage 2 <- pipelines; stages never import the layers above them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABOVE = {"stage1_tokenizer": ("stage2_prior", "pipelines"), "stage2_prior": ("pipelines",)}


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_stages_do_not_import_the_layers_above(package):
    offending = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / package).glob("*.py"))
                 for name in _imported_modules(path) if name.split(".")[0] in ABOVE[package]]
    assert offending == []


def test_the_import_scan_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipelines.pipeline import VQPipeline\n    import stage2_prior.sampling\n")
    assert _imported_modules(module) == ["pipelines.pipeline", "stage2_prior.sampling"]
