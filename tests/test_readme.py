"""The documentation holds: the adapter example trains, the config reference matches the code, every
link resolves, the README stays short, and no file points outside the repository.

``python tests/test_readme.py`` rewrites the generated part of docs/config.md from the code.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from reca.adapter import Condition, UMMAdapter
from reca.config import help_lines, load_config

from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
CONFIG_DOC = DOCS / "config.md"
# Generated blocks: "<!-- BEGIN generated: config -->" is the root config (`python train.py
# --help-config`); "<!-- BEGIN generated: package.module:Adapter -->" is that adapter's model.args.
BLOCK = re.compile(r"(<!-- BEGIN generated: (\S+) -->\n)(.*?)(<!-- END generated -->)", re.DOTALL)
MAX_README_LINES = 260


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def generated(key: str) -> str:
    if key == "config":
        lines = help_lines()
    else:
        from reca.build import import_adapter

        lines = help_lines(import_adapter(key).Config, "model.args.")
    return "```\n" + "\n".join(lines) + "\n```\n"


def write_config_reference() -> None:
    text = CONFIG_DOC.read_text()
    CONFIG_DOC.write_text(BLOCK.sub(lambda m: m.group(1) + generated(m.group(2)) + m.group(4), text))


def test_config_reference_is_in_sync() -> None:
    blocks = BLOCK.findall(CONFIG_DOC.read_text())
    assert "config" in [key for _, key, _, _ in blocks], "docs/config.md lost its generated config block"
    for _, key, body, _ in blocks:
        assert body == generated(key), f"docs/config.md, {key}: out of date; run `python tests/test_readme.py`"


def test_adapter_example_trains_through_reca(tmp_path: Path, toy_data: Path, monkeypatch) -> None:
    """docs/examples/my_umm.py, configured by docs/examples/my_umm.yaml, trains through reca."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("my_umm", None)
    from reca import trainer

    built = {}
    real_build = trainer.build
    monkeypatch.setattr(trainer, "build", lambda c: built.setdefault("pair", real_build(c)))
    cfg = load_config(
        EXAMPLES / "my_umm.yaml",
        [
            *[f"objectives.{k}.data.path={toy_data}" for k in ("recon", "t2i", "i2t")],
            f"train.output_dir={tmp_path / 'out'}",
        ],
    )
    assert cfg.model.adapter == "my_umm:MyUMM" and cfg.train.max_steps == 40
    trainer.fit(cfg)
    adapter, encoder = built["pair"]
    assert isinstance(adapter, UMMAdapter)

    log = [json.loads(line) for line in (tmp_path / "out/log.jsonl").read_text().splitlines()]
    first, last = sum(r["recon"] for r in log[:5]) / 5, sum(r["recon"] for r in log[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    # its save_pretrained output loads back through its own config key
    from my_umm import MyUMM, MyUMMConfig

    again = MyUMM.from_config(
        MyUMMConfig(semantic_dim=encoder.width, width=32, resolution=16, pretrained=str(tmp_path / "out/final"))
    )
    sem = torch.randn(1, 4, encoder.width)
    cond = Condition(semantic=sem, instructions=["Reconstruct."])
    a = adapter.generate(cond, seeds=[0], num_steps=4)[0]
    b = again.generate(cond, seeds=[0], num_steps=4)[0]
    assert a.size == (16, 16) and a.tobytes() == b.tobytes()
    # and final/ is evaluated as it is: train -> final/ -> reca-eval generate --checkpoint final
    from eval.cli import main as eval_main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"tag": "colors", "prompt": "a red car", "include": [{"class": "car"}]}) + "\n")
    out = tmp_path / "eval"
    argv = ["generate", "--checkpoint", str(tmp_path / "out/final"), "--prompts", str(prompts), "--out", str(out)]
    assert eval_main([*argv, "--n", "1", "--steps", "2", "--device", "cpu"]) == 0
    assert Image.open(out / "00000/samples/0000.png").size == (16, 16)


def test_readme_shows_the_example_file() -> None:
    """Every line of the README's adapter excerpt is a line of the file it links to."""
    text = README.read_text()
    assert "docs/examples/my_umm.py" in text
    source = {line.strip() for line in (EXAMPLES / "my_umm.py").read_text().splitlines()}
    excerpts = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert excerpts, "the README shows no Python excerpt"
    for excerpt in excerpts:
        for line in excerpt.splitlines():
            if line.strip() and line.strip() != "...":
                assert line.strip() in source, f"README excerpt line not in docs/examples/my_umm.py: {line!r}"


def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/ (at most {MAX_README_LINES})"


# ---- links -----------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    heading = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in prose(path.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            s = slug(m.group(1))
            seen[s] = seen.get(s, -1) + 1
            if seen[s]:
                seen[f"{s}-{seen[s]}"] = 0
    return set(seen)


def test_every_link_resolves() -> None:
    broken = []
    for md in markdown_files():
        for target in LINK.findall(prose(md.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (md.parent / file).resolve() if file else md
            where = f"{md.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif ROOT.resolve() not in dest.parents and dest != ROOT.resolve():
                broken.append(f"{where}: outside the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading #{anchor}")
    assert not broken, "\n".join(broken)


def test_every_doc_is_linked_from_the_readme_or_another_doc() -> None:
    linked = set()
    for md in markdown_files():
        for target in LINK.findall(prose(md.read_text())):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target) and target.partition("#")[0]:
                linked.add((md.parent / target.partition("#")[0]).resolve())
    orphans = [str(p.relative_to(ROOT)) for p in sorted(DOCS.rglob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"not linked from anywhere: {orphans}"


# ---- nothing points outside the repository ---------------------------------------------------

# Spelled in pieces so that this file does not match itself.
OUTSIDE = ["DESIGN" + ".md", ".." + "/shared", "/" + "work/"]


def test_no_file_refers_outside_the_repository() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    hits = []
    for name in filter(None, files):
        path = ROOT / name.decode()
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            hits += [f"{name.decode()}:{n}: {word}" for word in OUTSIDE if word in line]
    assert not hits, "cite the primary source instead:\n" + "\n".join(hits)


if __name__ == "__main__":
    write_config_reference()
    print(f"wrote {CONFIG_DOC.relative_to(ROOT)}")
