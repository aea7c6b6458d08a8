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


def test_readme_start_up_line_is_what_keys_example_json_gives():
    from addon.policy.keys import endpoint_line, load_keys
    readme = (ROOT / "README.md").read_text()
    [line] = [line for line in readme.splitlines() if line.startswith("gateway: OpenAI-compatible endpoint")]
    assert line == endpoint_line("http://127.0.0.1:8080", load_keys(str(ROOT / "keys.example.json")).summary())


def dockerfile() -> tuple[str, dict[str, str]]:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    env = dict(re.findall(r"(\w+)=(\S+)", next(line for line in text.splitlines() if line.startswith("ENV "))))
    return text, env


def test_the_dockerfile_says_how_to_run_the_image():
    text, env = dockerfile()
    runs = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#") and "docker run" in line]
    port = env["GATEWAY_PORT"]
    assert f"EXPOSE {port}" in text
    [gateway] = [run for run in runs if run.endswith(" llm-gateway")]
    assert f"-p {port}:{port}" in gateway
    mounts = re.findall(r"-v \S+?:(/[^:\s]+)", gateway)
    keys_dir = str(Path(env["KEYS_FILE"]).parent)
    assert env["KEYS_FILE"] in mounts or keys_dir in mounts, mounts  # the keys file, where KEYS_FILE looks
    assert str(Path(env["USAGE_DB"]).parent) in mounts  # the ledger outlives the container
    [demo] = [run for run in runs if run.endswith(" llm-gateway demo")]
    assert f"-p {port}:{port}" in demo


def test_the_image_carries_the_demo():
    text, _ = dockerfile()
    copied = {part.rstrip("/") for line in text.splitlines() if line.startswith("COPY ") for part in line.split()[1:-1]}
    assert {"run.sh", "requirements.txt", "addon", "fleet", "demo"} <= copied
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not {"demo", "addon", "fleet", "run.sh"} & ignored
