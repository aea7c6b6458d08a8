"""The README and docs/ stay true to the repository: the keys example is keys.example.json, and
every relative link (file and #anchor) points at something that exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    out, in_code = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_readme_keys_example_is_keys_example_json():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Keys file"):]
    block = section[section.index("```json") + len("```json"):]
    block = block[:block.index("```")]
    assert json.loads(block) == json.loads((ROOT / "keys.example.json").read_text())


def test_every_example_key_has_a_name():
    keys = json.loads((ROOT / "keys.example.json").read_text())["virtual_keys"]
    assert all(entry.get("name") for entry in keys.values())


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path):
    text = doc.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked (no network)
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


def test_readme_is_one_page():
    assert len((ROOT / "README.md").read_text().split()) < 2000
