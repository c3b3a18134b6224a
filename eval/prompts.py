"""Prompt sets for attribute-binding evaluation, all in GenEval's schema.

One record type, :class:`Prompt`, for every source:

* ``builtin`` — ``eval/data/attribute_binding.jsonl``, written for reca: counter-canonical colour–object
  pairs ("a yellow broccoli", tag ``color_rare``) each with its canonical control ("a green
  broccoli", ``color_canonical``), shape and texture bindings (``shape``/``texture``; the attribute
  sits in each include item under ``"attribute"``) and two-object colour binding (``color_attr``).
  Colours are only GenEval's ten, so GenEval's colour classifier applies unchanged.
* GenEval ``evaluation_metadata.jsonl`` (``load_geneval``): one JSON object a line; unknown keys are
  kept in ``Prompt.extra`` (variants of the file add fields).
* T2I-CompBench ``{category}_val.txt`` (``load_t2i_compbench``): one prompt a line, tag = category.
  Simple "a ATTR NOUN and a ATTR NOUN" lines are parsed into include items so that attribute
  scorers can check them; other lines keep an empty ``include`` (scorers then fall back to the
  whole prompt).
* DPG-Bench ``dpg_bench.csv`` (``load_dpg_bench``): one row per question, grouped into prompts; the
  questions and their dependencies ride in ``Prompt.extra["dpg_questions"]`` (scored by eval.dpg).

The ``index`` of a prompt is its position in the set (0-based, blank lines skipped). It names the
output folder (``00042/``), so it must not depend on anything but the file's content.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_PATH = DATA_DIR / "attribute_binding.jsonl"
OBJECT_NAMES_PATH = DATA_DIR / "object_names.txt"
# copies of the benchmarks' prompt files, each folder with its licence (both MIT)
GENEVAL_PATH = DATA_DIR / "geneval" / "evaluation_metadata.jsonl"
T2I_COMPBENCH_DIR = DATA_DIR / "t2i_compbench"
NAMED = {"builtin": BUILTIN_PATH, "geneval": GENEVAL_PATH, "t2i-compbench": T2I_COMPBENCH_DIR}

#: GenEval's colour vocabulary (its order is GenEval's; it also breaks ties in argmax).
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

T2I_COMPBENCH_CATEGORIES: tuple[str, ...] = ("color", "shape", "texture")

_GENEVAL_KEYS = ("tag", "prompt", "include", "exclude")


class EvalError(ValueError):
    """A bad input to the evaluation suite; the message is one line naming the file or field."""


@dataclass
class Prompt:
    """One evaluation prompt in GenEval's schema.

    ``include`` items: ``{"class": str, "count": int, "color"?: str, "position"?: [relation, i],
    "attribute"?: str}``; ``exclude`` items: ``{"class": str, "count": int}``; ``extra`` holds any
    other top-level keys of the source line, written back unchanged by :meth:`to_geneval`.
    """

    index: int
    prompt: str
    tag: str
    include: list[dict] = field(default_factory=list)
    exclude: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_geneval(self) -> dict[str, Any]:
        """The GenEval metadata line for this prompt (what ``<index>/metadata.jsonl`` holds)."""
        line: dict[str, Any] = {"tag": self.tag, "include": self.include}
        if self.exclude:
            line["exclude"] = self.exclude
        line["prompt"] = self.prompt
        line.update(self.extra)
        return line

    @classmethod
    def from_geneval(cls, index: int, line: dict[str, Any], where: str) -> "Prompt":
        """Parse one GenEval line (a dict); ``where`` ("file:line") prefixes every error."""
        if not isinstance(line, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(line).__name__}")
        prompt = line.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvalError(f"{where}: field 'prompt' must be a non-empty string")
        tag = line.get("tag")
        if not isinstance(tag, str) or not tag.strip():
            raise EvalError(f"{where}: field 'tag' must be a non-empty string (the category the prompt is reported in)")
        if "include" not in line:
            raise EvalError(f"{where}: field 'include' is missing; list the objects the image must show")
        include = _items(line["include"], "include", where)
        if not include and "dpg_questions" not in line:  # DPG-Bench prompts carry questions instead
            raise EvalError(f"{where}: field 'include' is empty; a prompt with nothing to check cannot be scored")
        exclude = _items(line.get("exclude", []), "exclude", where)
        _check_positions(include, where)
        extra = {k: v for k, v in line.items() if k not in _GENEVAL_KEYS}
        return cls(index=index, prompt=prompt, tag=tag, include=include, exclude=exclude, extra=extra)


def _items(value: Any, name: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise EvalError(f"{where}: field '{name}' must be a list")
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("class"), str):
            raise EvalError(f"{where}: {name}[{i}] must be an object with a string 'class'")
        count = item.get("count", 1)
        # bool is an int in Python; GenEval's include counts are >= 1 (an exclude's count is its threshold)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise EvalError(f"{where}: {name}[{i}].count must be a positive integer, got {count!r}")
        color = item.get("color")
        if color is not None and color not in COLORS:
            raise EvalError(f"{where}: {name}[{i}].color '{color}' is not one of GenEval's colours {list(COLORS)}")
    return [dict(item) for item in value]


def _check_positions(include: list[dict], where: str) -> None:
    """GenEval's ``position: [relation, j]`` refers to include item ``j`` (another object)."""
    for i, item in enumerate(include):
        if "position" not in item:
            continue
        pos = item["position"]
        ok = isinstance(pos, list) and len(pos) == 2 and isinstance(pos[0], str)
        j = pos[1] if ok else None
        if not ok or isinstance(j, bool) or not isinstance(j, int):
            raise EvalError(f"{where}: include[{i}].position must be [relation, index], got {pos!r}")
        if not 0 <= j < len(include) or j == i:
            raise EvalError(
                f"{where}: include[{i}].position refers to include[{j}], which is not another item "
                f"(valid: 0..{len(include) - 1} except {i})"
            )


# --------------------------------------------------------------------------- loaders


def read_lines(path: Path) -> list[str]:
    """The file's lines as UTF-8, split on ``\\n`` only (``str.splitlines`` would also split on
    U+2028 and other separators that are valid inside a JSON string); a trailing ``\\r`` is dropped."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise EvalError(f"{path}: cannot read ({e.strerror})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line; a malformed line fails naming file:line."""
    rows = []
    for lineno, raw in enumerate(read_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((lineno, json.loads(raw)))
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    return rows


def load_geneval(path: str | Path) -> list[Prompt]:
    """GenEval ``evaluation_metadata.jsonl`` (or any file in its schema, e.g. the builtin set)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such prompt file")
    prompts: list[Prompt] = []
    for lineno, line in read_jsonl(path):
        prompts.append(Prompt.from_geneval(len(prompts), line, f"{path}:{lineno}"))
    if not prompts:
        raise EvalError(f"{path}: contains no prompts")
    return prompts


def load_t2i_compbench(path_or_dir: str | Path, categories: Sequence[str] = T2I_COMPBENCH_CATEGORIES) -> list[Prompt]:
    """T2I-CompBench ``{category}_val.txt`` files: a directory holding them (read in the order of
    ``categories``, never listing order) or one such file. Indices run on across files."""
    path = Path(path_or_dir)
    if path.is_dir():
        files = [(cat, path / f"{cat}_val.txt") for cat in categories]
        missing = [str(f) for _, f in files if not f.is_file()]
        if missing:
            raise EvalError(f"{path}: missing T2I-CompBench file(s) {', '.join(missing)}")
    elif path.is_file():
        files = [(path.name.removesuffix(".txt").removesuffix("_val"), path)]
    else:
        raise EvalError(f"{path}: no such T2I-CompBench file or directory")
    prompts: list[Prompt] = []
    for category, file in files:
        for lineno, raw in enumerate(read_lines(file), start=1):
            text = raw.strip()
            if not text:
                continue
            prompts.append(
                Prompt(
                    index=len(prompts),
                    prompt=text,
                    tag=category,
                    include=parse_attribute_phrases(text, category),
                    extra={"source": f"{file.name}:{lineno}"},
                )
            )
    if not prompts:
        raise EvalError(f"{path}: contains no prompts")
    return prompts


DPG_COLUMNS = ("item_id", "text", "proposition_id", "dependency", "category_broad", "question_natural_language")


def load_dpg_bench(path: str | Path) -> list[Prompt]:
    """DPG-Bench ``dpg_bench.csv``: one row per question (``item_id``, ``text``, ``proposition_id``,
    ``dependency`` = comma-separated parent proposition ids, ``0`` for none, ``category_broad``,
    ``question_natural_language``...). Rows are grouped by ``item_id`` in file order into one
    prompt each (tag ``dpg``) whose questions go to ``extra["dpg_questions"]`` for
    :mod:`eval.dpg`. Every row is read (the official script skips the file's first question)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such DPG-Bench file")
    reader = csv.DictReader(io.StringIO("\n".join(read_lines(path))))
    missing = [c for c in DPG_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise EvalError(f"{path}: missing DPG-Bench column(s) {', '.join(missing)} (header: {reader.fieldnames})")
    items: dict[str, dict[str, Any]] = {}
    for raw in reader:
        lineno = reader.line_num  # the record's last physical line (a quoted field may span lines)
        where = f"{path}:{lineno}"
        row = {k: v or "" for k, v in raw.items() if k is not None}  # a short row's missing fields are None
        try:
            qid = int(row["proposition_id"])
            parents = [int(d) for d in row["dependency"].split(",") if int(d) != 0]
        except (TypeError, ValueError):
            raise EvalError(
                f"{where}: proposition_id and dependency must be integers (dependency '0' = none)"
            ) from None
        item = items.setdefault(row["item_id"], {"text": row["text"], "questions": [], "line": lineno})
        if row["text"] != item["text"]:
            raise EvalError(f"{where}: item_id {row['item_id']} has a different text than on line {item['line']}")
        if any(q["id"] == qid for q in item["questions"]):
            raise EvalError(f"{where}: item_id {row['item_id']} repeats proposition_id {qid}")
        question = (row["question_natural_language"] or "").strip()
        category = (row["category_broad"] or "").strip()
        if not question or not category:
            raise EvalError(f"{where}: question_natural_language and category_broad must be non-empty")
        item["questions"].append({"id": qid, "question": question, "parents": parents, "category": category})
    prompts: list[Prompt] = []
    for item_id, item in items.items():
        ids = {q["id"] for q in item["questions"]}
        for q in item["questions"]:
            unknown = [p for p in q["parents"] if p not in ids]
            if unknown:
                raise EvalError(f"{path}: item_id {item_id} question {q['id']} depends on unknown id(s) {unknown}")
        extra = {"item_id": item_id, "dpg_questions": item["questions"]}
        prompts.append(Prompt(index=len(prompts), prompt=item["text"].strip(), tag="dpg", extra=extra))
    if not prompts:
        raise EvalError(f"{path}: contains no prompts")
    return prompts


def load_builtin() -> list[Prompt]:
    """reca's attribute-binding set (``eval/data/attribute_binding.jsonl``)."""
    return load_geneval(BUILTIN_PATH)


def load_prompts(spec: str | Path) -> list[Prompt]:
    """A named set (``builtin``, ``geneval``: its 553 prompts, ``t2i-compbench``: colour, shape and
    texture val), a GenEval-schema ``.jsonl``, a T2I-CompBench ``.txt`` or a directory of them, or a
    DPG-Bench ``.csv``."""
    path = NAMED.get(str(spec), Path(spec))
    if path.is_dir():
        return load_t2i_compbench(path)
    if path.suffix == ".jsonl":
        return load_geneval(path)
    if path.suffix == ".txt":
        return load_t2i_compbench(path)
    if path.suffix == ".csv":
        return load_dpg_bench(path)
    raise EvalError(
        f"--prompts {spec}: expected 'builtin', 'geneval', 't2i-compbench', a .jsonl (GenEval schema), a .txt or a "
        "directory of T2I-CompBench files, or a DPG-Bench .csv"
    )


def prompt_source_files(spec: str | Path) -> list[Path]:
    """The files ``load_prompts(spec)`` reads, in reading order (hashed into the run manifest)."""
    path = NAMED.get(str(spec), Path(spec))
    if path.is_dir():
        return [path / f"{cat}_val.txt" for cat in T2I_COMPBENCH_CATEGORIES]
    return [path]


def prompts_digest(prompts: Iterable[Prompt]) -> str:
    """sha256 of the prompts' canonical GenEval lines, sorted by index: identifies a prompt set
    whatever file (or formatting) it came from."""
    h = hashlib.sha256()
    for p in sorted(prompts, key=lambda p: p.index):
        h.update(json.dumps({"index": p.index, **p.to_geneval()}, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_object_names(path: str | Path = OBJECT_NAMES_PATH) -> list[str]:
    """GenEval's 80 COCO class names (copied from GenEval, MIT; see data/geneval/LICENSE)."""
    names = [line.strip() for line in read_lines(Path(path)) if line.strip()]
    if not names:
        raise EvalError(f"{path}: no object names")
    return names


# --------------------------------------------------------------------------- T2I-CompBench parsing

_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_PHRASE = re.compile(r"^([a-z]+)\s+([a-z][a-z '\-]*[a-z])$")
_SIMPLE_LINE = re.compile(r"^[a-z][a-z '\-]*$")


def parse_attribute_phrases(text: str, category: str) -> list[dict]:
    """Best-effort include items for "a ATTR NOUN and a ATTR NOUN" prompts; ``[]`` otherwise.

    Only lowercase, punctuation-free lines are parsed (the benchmark's templated ones); its
    free-form captions ("A small white kitchen with brown wood floor.") would be guessed wrong,
    so they are left for whole-prompt scoring instead. Colours outside GenEval's ten (e.g. "gray")
    are kept as ``attribute`` only, so GenEval-style colour scorers do not misread them.
    """
    if not _SIMPLE_LINE.match(text):
        return []
    items = []
    for phrase in text.split(" and "):
        m = _PHRASE.match(_ARTICLE.sub("", phrase.strip()))
        if m is None:
            return []
        attribute, noun = m.group(1), m.group(2).strip()
        item: dict[str, Any] = {"class": noun, "count": 1, "attribute": attribute}
        if category == "color" and attribute in COLORS:
            item["color"] = attribute
        items.append(item)
    return items


def attribute_of(item: dict) -> str | None:
    """The attribute an include item binds: its GenEval ``color``, else reca's ``attribute``."""
    return item.get("color") or item.get("attribute")
