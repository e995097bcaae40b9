"""What the repository points a user or contributor at is in the repository."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / f for f in out.split()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): walk the tree
        files = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return [p for p in files if p.suffix in (".py", ".md", ".c", ".h", ".toml", ".cfg") and p.is_file()]


def test_every_markdown_file_named_exists():
    """Any Markdown file a source file, docstring or document names (README, docs/, code
    comments) exists: relative to the repository root, or to the naming document's folder."""
    missing = []
    for f in _tracked_text_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b", text):
            name = m.group(1)
            if not ((ROOT / name).exists() or (f.parent / name).exists() or (ROOT / "docs" / name).exists()):
                missing.append(f"{f.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?!https?:)[^)#]+)", text)
    assert links, "the README links its docs"
    assert [link for link in links if not (ROOT / link).exists()] == []
    for doc in ("architecture.md", "format.md", "kernels.md", "benchmarks.md"):
        assert (ROOT / "docs" / doc).is_file(), doc


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_documents_resolve():
    """Every relative link in the README and docs/ names a file that exists and, with #anchor, a
    heading of that file."""
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([^)\s]+))?\)", doc.read_text()):
            path = (doc.parent / target).resolve() if target else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and path.suffix == ".md":
                heads = {_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
                if anchor not in heads:
                    broken.append(f"{doc.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, broken


def test_the_repository_speaks_of_the_product_alone():
    """No numbered work items or working sessions in code, comments or documents: a figure names its
    machine, command and commit, not the work that made it."""
    said = re.compile(r"\b(?:issue|ticket|session) #?\d+|\bthis session\b|\b(?:an? )?earlier session|"
                      r"\bsession \d|\bissue \d+'s\b", re.I)
    found = [f"{f.relative_to(ROOT)}:{i}: {line.strip()[:80]}"
             for f in _tracked_text_files() if f.name != "test_docs.py"
             for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if said.search(line)]
    assert not found, found
