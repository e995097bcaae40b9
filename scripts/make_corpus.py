"""Build the training corpus of the embedded demo model from text shipped with CPython itself.

Provenance and license: every byte comes from the standard library of the running CPython
(3.11.7 when the shipped model was trained): the pydoc help topics in ``Lib/pydoc_data/topics.py``
(excerpts of the Python Language Reference), the docstrings and block comments of
``Lib/**/*.py`` and IDLE's plain-text notes (``Lib/idlelib/*.txt``). Python and its
documentation are (c) Python Software Foundation and distributed under the PSF License
Version 2, which allows redistribution of derived text with the copyright notice kept.
Nothing is downloaded.

Documents: one per help topic, one per source file (its docstrings and comment blocks of two or
more lines, in source order; site-packages and test-data folders skipped). Only English prose
is kept (see ``is_prose``), repeated paragraphs are dropped, and documents are assigned to
train or held-out by a hash of their name, so the split does not depend on traversal order or
on the other documents.

Outputs:
- ``OUT/train.jsonl``, ``OUT/heldout.jsonl`` (``{"id", "text"}`` per line) and
  ``OUT/manifest.json`` in a cache folder outside the repo (default ``~/.cache/dbrxq/corpus``);
- ``calibration/data/heldout.txt``: ~150 KB of held-out documents (never trained on), for
  perplexity and KL evaluation;
- ``calibration/data/calib.txt``: ~150 KB of training documents (disjoint from held-out), for
  quantization calibration.

    python scripts/make_corpus.py [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import logging
import re
import sys
import sysconfig
import tokenize
from pathlib import Path

log = logging.getLogger("make_corpus")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path.home() / ".cache" / "dbrxq" / "corpus"
DATA_DIR = REPO / "calibration" / "data"
HELDOUT_PERCENT = 6  # documents whose name hashes into [0, 6) of 100 are held out
SAMPLE_BYTES = 150_000  # size of each of the two text files written into the repo
DOC_SEP = "\n\n\n"  # between documents in the .txt files
# Third-party packages are not CPython's; test data folders hold deliberately odd sources.
SKIP_PARTS = {"site-packages", "__pycache__", "pydoc_data", "data"}
# Plain-text prose shipped in Lib (IDLE's notes and history).
TEXT_FILES = ("idlelib/README.txt", "idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt",
              "idlelib/TODO.txt", "idlelib/extend.txt", "idlelib/CREDITS.txt")
LICENSE = ("CPython standard library text (pydoc topics, docstrings, comments), (c) Python Software "
           "Foundation, PSF License Version 2")


def is_prose(text: str) -> bool:
    """English prose, roughly: mostly ASCII letters and spaces, several words, few code symbols."""
    if len(text) < 24 or len(text.split()) < 4:
        return False
    if sum(c.isascii() for c in text) < 0.98 * len(text):
        return False
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    symbols = sum(c in "{}[]()=<>_*#|\\/;@$%^~`" for c in visible)
    return letters >= 0.7 * len(visible) and symbols <= 0.06 * len(visible)


def strip_doctests(text: str) -> str:
    """Drop interactive examples (``>>>`` lines and the output lines that follow them)."""
    out, in_example = [], False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(">>>"):
            in_example = True
            continue
        if in_example and s:
            continue
        in_example = False
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def docstrings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, cleaned docstring) of the module, its classes and functions."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append((getattr(node, "lineno", 0), strip_doctests(doc)))
    return found


def comment_blocks(source: str) -> list[tuple[int, str]]:
    """(line, text) of runs of >= 2 consecutive full-line comments, joined into one paragraph."""
    blocks, run, start, last = [], [], 0, -2
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []
    for tok in tokens:
        if tok.type != tokenize.COMMENT or tok.line.strip() != tok.string.strip():
            continue  # only comments on a line of their own
        row = tok.start[0]
        text = tok.string.lstrip("#").strip()
        if row != last + 1 or not text:
            if len(run) >= 2:
                blocks.append((start, " ".join(run)))
            run, start = [], row
        if text:
            run.append(text)
        last = row
    if len(run) >= 2:
        blocks.append((start, " ".join(run)))
    return blocks


def stdlib_documents(lib: Path) -> list[tuple[str, str]]:
    """(id, text) per source file of the standard library, prose paragraphs in source order."""
    docs = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if SKIP_PARTS & set(rel.parts[:-1]):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        pieces = sorted(docstrings(tree) + comment_blocks(source))
        paras = [p for _, text in pieces for p in re.split(r"\n\s*\n", text) if is_prose(p)]
        if paras:
            docs.append((f"Lib/{rel.as_posix()}", "\n\n".join(paras)))
    return docs


def topic_documents(lib: Path) -> list[tuple[str, str]]:
    """(id, text) per pydoc help topic (the Language Reference excerpts), in sorted order."""
    tree = ast.parse((lib / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    # The file is one assignment `topics = {...}` of string literals: read it without running it.
    value = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "topics")
    topics = ast.literal_eval(value)
    return [(f"topics:{k}", v.strip()) for k, v in sorted(topics.items()) if v.strip()]


def text_documents(lib: Path) -> list[tuple[str, str]]:
    """(id, text) per plain-text file of ``TEXT_FILES``, prose paragraphs only."""
    docs = []
    for rel in TEXT_FILES:
        path = lib / rel
        if path.is_file():
            paras = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if is_prose(p)]
            docs.append((f"Lib/{rel}", "\n\n".join(paras)))
    return docs


def split_of(doc_id: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "little") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def dedupe(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop repeated paragraphs (first occurrence wins), then documents left empty."""
    seen: set[str] = set()
    out = []
    for doc_id, text in docs:
        keep = []
        for para in text.split("\n\n"):
            key = " ".join(para.split())
            if key not in seen:
                seen.add(key)
                keep.append(para)
        if keep:
            out.append((doc_id, "\n\n".join(keep)))
    return out


def sample_text(docs: list[tuple[str, str]], nbytes: int) -> str:
    """Whole documents, in hash order (a fixed shuffle), until about `nbytes` (the last may be cut)."""
    order = sorted(docs, key=lambda d: hashlib.sha256(("sample/" + d[0]).encode()).digest())
    parts, size = [], 0
    for _, text in order:
        if size >= nbytes:
            break
        text = text[: nbytes - size]
        parts.append(text)
        size += len(text.encode()) + len(DOC_SEP)
    return DOC_SEP.join(parts) + "\n"


def build(out: Path, data_dir: Path = DATA_DIR) -> dict:
    """Write the corpus to `out` and the two sample files to `data_dir`; returns the manifest."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    if sys.version_info[:3] != (3, 11, 7):
        log.warning("CPython %s, not 3.11.7: the corpus will differ from the shipped model's",
                    sys.version.split()[0])
    docs = dedupe(topic_documents(lib) + stdlib_documents(lib) + text_documents(lib))
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for doc in docs:
        splits[split_of(doc[0])].append(doc)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"source": f"CPython {sys.version.split()[0]} standard library at {lib}", "license": LICENSE}
    for name, part in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for doc_id, text in part:
                f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        manifest[name] = {"documents": len(part), "chars": sum(len(t) for _, t in part)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "heldout.txt").write_text(sample_text(splits["heldout"], SAMPLE_BYTES))
    (data_dir / "calib.txt").write_text(sample_text(splits["train"], SAMPLE_BYTES))
    return manifest


def read_jsonl(path: Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="corpus folder (outside the repo)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = build(args.out)
    print(json.dumps(manifest, indent=2))
    print(f"wrote {args.out} and {DATA_DIR}/{{heldout,calib}}.txt")


if __name__ == "__main__":
    main()
