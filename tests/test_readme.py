"""The documentation stays true: README.md and docs/*.md are checked against the code.

* every ```python block runs as written (fresh namespace, CPU, in a temporary folder);
  blocks that are not meant to run carry another info string (```bash, ```text);
* relative links and the repository paths and ``scaleinv_kernels.*`` names the documents
  mention exist;
* the generated benchmark report and the README's benchmark table are what
  ``benchmarks/bench_report.py`` renders from ``benchmarks/results/*.json``;
* every public name of the package has a docstring, and pydoc renders it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pydoc
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024  # bytes: the README is read in five minutes, details live in docs/

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks() -> list[tuple[str, int, str, str]]:
    out = []
    for doc in DOCS:
        for i, m in enumerate(FENCE.finditer(doc.read_text())):
            out.append((_rel(doc), i, m["info"].strip(), m["body"]))
    return out


BLOCKS = _blocks()
PYTHON = [(f, i, body) for f, i, info, body in BLOCKS if info == "python"]


def test_readme_has_its_two_quick_starts_and_fits_in_12_kb():
    readme = [body for f, _, body in PYTHON if f == "README.md"]
    assert any("FusedSGDWD(" in b for b in readme), "README: no FusedSGDWD quick start"
    assert any("Ensemble(" in b for b in readme), "README: no Ensemble quick start"
    assert all(len(b.splitlines()) <= 20 for b in readme), "a README quick start > 20 lines"
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, more than {README_LIMIT}"


def test_every_code_block_says_what_it_is():
    bare = [f"{f} block {i}" for f, i, info, _ in BLOCKS if not info]
    assert not bare, f"code blocks without an info string (python/bash/text): {bare}"


@pytest.mark.parametrize("doc,index,code", PYTHON,
                         ids=[f"{f}-{i}" for f, i, _ in PYTHON])
def test_python_block_runs(doc: str, index: int, code: str, tmp_path: Path, monkeypatch):
    # A fresh namespace per block, in an empty folder (blocks may write files), on the CPU
    # with a fixed seed. An exception fails the test with the block's own line numbers.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    torch.manual_seed(0)
    namespace = {"__name__": f"docblock_{index}"}
    exec(compile(code, f"{doc} (python block {index})", "exec"), namespace)


# ----------------------------------------------------------------------------------
# links, paths and names
# ----------------------------------------------------------------------------------

LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"^(?:csrc|scaleinv_kernels|tests|benchmarks|docs|\.ci)/[\w./-]*$")
DOTTED = re.compile(r"^scaleinv_kernels(?:\.\w+)+")


def _anchors(markdown: str) -> set[str]:
    text = FENCE.sub("", markdown)
    heads = re.findall(r"^#{1,6} (.+)$", text, re.M)
    out: set[str] = set()
    seen: dict[str, int] = {}
    for h in heads:  # GitHub numbers repeated headings: t, t-1, t-2, ...
        base = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_point_at_files_and_headings(doc: Path):
    broken = []
    for m in LINK.finditer(FENCE.sub("", doc.read_text())):
        target = m["target"]
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(target)
    assert not broken, f"{_rel(doc)}: broken links {broken}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        name = ".".join(parts[:k])
        try:
            obj = importlib.import_module(name)
        except ImportError:
            continue
        try:
            for attr in parts[k:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_mentioned_paths_and_modules_exist(doc: Path):
    missing = []
    for span in CODE_SPAN.findall(FENCE.sub("", doc.read_text())):
        word = span.split("::")[0].split(" ")[0].rstrip(".,;:")
        if REPO_PATH.match(word) and "<" not in word and "*" not in word:
            if not (ROOT / word).exists():
                missing.append(word)
        m = DOTTED.match(word)
        if m and not _resolves(m.group(0)):
            missing.append(m.group(0))
    assert not missing, f"{_rel(doc)} names what does not exist: {missing}"


# ----------------------------------------------------------------------------------
# the generated benchmark report
# ----------------------------------------------------------------------------------


def test_benchmark_report_and_readme_table_are_generated():
    br = benchmark_module("bench_report")
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files, "no benchmark results in benchmarks/results/"
    docs = [(f.name, br.load(f)) for f in files]
    stale = "stale: run `make bench-report` (numbers come from benchmarks/results/*.json)"
    assert (ROOT / "docs" / "benchmarks.md").read_text() == br.render(docs), stale
    readme = (ROOT / "README.md").read_text()
    assert br.README_BLOCK.search(readme), "README.md has no generated benchmark table"
    assert br.update_readme(readme, {Path(n).stem: d for n, d in docs}) == readme, stale


# ----------------------------------------------------------------------------------
# docstrings of the public API
# ----------------------------------------------------------------------------------

PUBLIC_MODULES = ("scaleinv_kernels", "scaleinv_kernels.ensemble", "scaleinv_kernels.optim")


def _public_names() -> list[tuple[str, str]]:
    return [(m, n) for m in PUBLIC_MODULES for n in importlib.import_module(m).__all__]


def _defining_modules(name: str) -> list[str]:
    """The loaded package modules whose source assigns ``name`` at top level."""
    out = []
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("scaleinv_kernels") or mod is None:
            continue
        try:
            source = inspect.getsource(mod)
        except (OSError, TypeError):
            continue
        if re.search(rf"^{name}\s*(?::[^=]*)?=", source, re.M):
            out.append(mod_name)
    return out


def _documented_constant(owner: str, name: str) -> bool:
    """A constant has no docstring of its own: it counts as documented when a ``#:``
    comment precedes its assignment, or its module's docstring or one of the module's
    class docstrings names it."""
    module = importlib.import_module(owner)
    source = inspect.getsource(module)
    if re.search(rf"^#:.*\n(?:#:.*\n)*{name}\b", source, re.M):
        return True
    texts = [module.__doc__ or ""] + [c.__doc__ or "" for _, c in
                                      inspect.getmembers(module, inspect.isclass)]
    return any(re.search(rf"\b{name}\b", t) for t in texts)


@pytest.mark.parametrize("module,name", _public_names(), ids=lambda v: v)
def test_public_name_has_a_docstring(module: str, name: str):
    obj = getattr(importlib.import_module(module), name)
    if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj):
        doc = obj.__doc__ if inspect.ismodule(obj) else inspect.getdoc(obj)
        assert doc and doc.strip(), f"{module}.{name} has no docstring"
        if inspect.isclass(obj):
            # its own public methods too; an override of a documented base-class method
            # (e.g. torch.optim.Optimizer.load_state_dict) keeps that documentation
            undocumented = [k for k, v in vars(obj).items() if not k.startswith("_")
                            and (inspect.isfunction(v) or isinstance(v, property))
                            and not (inspect.getdoc(getattr(obj, k)) or "").strip()]
            assert not undocumented, f"{module}.{name}: methods without docstring " \
                                     f"{undocumented}"
    else:
        defining = _defining_modules(name)
        assert defining, f"{module}.{name}: no module assigns it"
        assert any(_documented_constant(m, name) for m in defining), \
            f"{module}.{name} is documented nowhere"
    pydoc.render_doc(obj, renderer=pydoc.plaintext)  # must not raise
