"""The package layering of docs/architecture.md holds: every module imports (at top level or
inside functions) only from its own package and the layers below; command entry points may
import anything."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megatron_mft"
#: bottom to top; a package may import from the ones before it
LAYERS = ["compat", "config", "launch", "data", "model", "loss", "peft", "checkpoint", "training", "evaluate"]
ENTRY_POINTS = {"__main__.py"}  # and the top-level train.py, convert.py, plot.py (not in a layer)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_mft."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("megatron_mft.")}
    return found


def test_layers_import_only_downwards():
    assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()) == sorted(LAYERS)
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if len(rel.parts) < 2 or rel.name in ENTRY_POINTS:
            continue
        own = LAYERS.index(rel.parts[0])
        bad += [f"{rel} imports megatron_mft.{m}" for m in sorted(_imports(path))
                if m in LAYERS and LAYERS.index(m) > own]
    assert not bad, bad


def test_wheel_holds_every_module(tmp_path):
    """``pip install`` gets the whole package, every module and the docs shipped beside the code
    (``data/FORMAT.md``): a source checkout on PYTHONPATH would never notice a package or a
    package-data pattern that the build leaves out."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(PKG, src / "megatron_mft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PKG.parent / name, src / name)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("megatron_mft-*.whl")
    packed = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("megatron_mft/")}
    tree = {p.relative_to(PKG.parent).as_posix() for p in PKG.rglob("*") if p.suffix in (".py", ".md")
            and "__pycache__" not in p.parts}
    assert tree - packed == set()
