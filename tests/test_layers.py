"""The tree's layering, checked: imports flow one way (library ← evaluation ← demo), the library
in pipeline order, and the config layer imports no torch (so `train.py --help-config` and a bad
config answer at once)."""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys

import pytest

from conftest import ROOT

# Lowest first. A module may import only modules of a strictly lower layer (and package faces);
# every module of reca/, eval/ and demo/ must match exactly one pattern here.
LAYERS: list[list[str]] = [
    ["reca.config"],
    ["reca.io", "reca.instructions"],
    ["reca.seeds", "reca.images"],
    ["reca.data", "reca.encoders", "reca.flow"],
    ["reca.adapter"],
    ["reca.models.common", "reca.models.tokenizer", "reca.models.mar"],  # mar: pure torch modules under harmon
    ["reca.models.*"],
    ["reca.objectives", "reca.cache"],
    ["reca.build"],
    ["reca.samples", "reca.checkpoint", "reca.monitor", "reca.card"],
    ["reca.trainer"],
    ["reca.merge"],
    # the evaluation suite: above the whole library
    ["eval.prompts", "eval.stats"],
    ["eval.dpg"],
    ["eval.entropy", "eval.scorers", "eval.runner"],
    ["eval.report", "eval.probe"],
    ["eval.cli", "eval.during"],
    # the demo application: above evaluation
    ["demo.world", "demo.seeds"],
    ["demo.scorer", "demo.encoder", "demo.report"],
    ["demo.run"],
    ["demo.__main__"],
]
PACKAGES = ("reca", "eval", "demo")
FACES = (*PACKAGES, "reca.models")  # package faces: a docstring and __version__, nothing to layer


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, object]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def layer_of(name: str) -> int:
    matches = [i for i, patterns in enumerate(LAYERS) if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    exact = [i for i, patterns in enumerate(LAYERS) if name in patterns]
    if exact:
        return exact[0]
    if len(matches) != 1:
        raise AssertionError(f"{name}: matches {len(matches)} layers in tests/test_layers.py LAYERS; place it in one")
    return matches[0]


def imports_of(source: str) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from reca import checkpoint`
    return names


def internal(name: str, known: dict) -> str | None:
    """The project module an import names (longest known prefix), or None for third-party ones."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def sources() -> dict[str, str]:
    return {name: path.read_text(encoding="utf-8") for name, path in modules().items()}


def upward_imports(code: dict[str, str]) -> list[str]:
    bad = []
    for name, source in code.items():
        if name in FACES:
            continue
        own = layer_of(name)
        for imported in sorted(imports_of(source)):
            target = internal(imported, code)
            if target is None or target in FACES or target == name:
                continue
            if layer_of(target) >= own:
                bad.append(f"{name} (layer {own}) imports {target} (layer {layer_of(target)})")
    return bad


def test_every_module_has_a_layer() -> None:
    for name in modules():
        if name not in FACES:
            layer_of(name)


def test_imports_flow_one_way() -> None:
    assert upward_imports(sources()) == []


@pytest.mark.parametrize(
    "module, line",
    [
        ("eval.report", "import demo.run"),
        ("reca.config", "from reca.data import batches"),
        ("reca.cache", "from reca.build import build"),
        ("eval.probe", "from eval.cli import main"),
    ],
)
def test_an_upward_import_is_caught(module: str, line: str) -> None:
    code = sources()
    code[module] += f"\n\ndef _late():\n    {line}\n"  # inside a function: still an import
    assert any(b.startswith(f"{module} ") for b in upward_imports(code)), line


@pytest.mark.parametrize("module", ["reca.config", "train"])
def test_the_config_layer_imports_no_torch(module: str) -> None:
    code = (
        f"import sys; import {module}; assert 'torch' not in sys.modules, [m for m in sys.modules if 'torch' in m][:3]"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_help_config_and_a_bad_config_answer_without_torch(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: -1\n")
    for args, code in ((["--help-config"], 0), (["--config", str(bad)], 2)):
        run = (
            "import runpy, sys; sys.argv = ['train.py', *sys.argv[1:]]\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert 'torch' not in sys.modules; raise"
        )
        proc = subprocess.run([sys.executable, "-c", run, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == code, proc.stderr[-2000:]
