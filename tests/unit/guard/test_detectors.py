"""Each detector against its corpus (precision and recall reported), each against the others'
samples (a card is not a phone), and all of them against the project's own recorded traffic,
docs and code: not one false positive."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest

from addon.guard import detectors
from addon.guard.scan import Scanner
from tests.conftest import SHARED_REFERENCE
from tests.unit.guard.corpus import NEGATIVE, POSITIVE

ROOT = Path(__file__).resolve().parents[3]
RECORDED = SHARED_REFERENCE / "recorded"
NAMES = detectors.NAMES


def scanner(*names: str) -> Scanner:
    return Scanner([detectors.builtin(n) for n in names])


def test_every_detector_has_a_corpus():
    assert set(POSITIVE) == set(NEGATIVE) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_precision_and_recall(name, capsys):
    alone = scanner(name)
    tp = fn = fp = 0
    missed, fired = [], []
    for text, secret in POSITIVE[name]:
        masked = alone.mask(text)
        if masked is not None and secret not in masked and f"[REDACTED:{name}]" in masked:
            tp += 1
        else:
            fn += 1
            missed.append(text[:60])
    for text in NEGATIVE[name]:
        if alone.spans(text):
            fp += 1
            fired.append(text[:60])
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    with capsys.disabled():
        print(f"\n  {name:13} precision {precision:.2f} recall {recall:.2f} "
              f"({len(POSITIVE[name])} positives, {len(NEGATIVE[name])} look-alikes)")
    assert not missed, f"{name} missed: {missed}"
    assert not fired, f"{name} fired on: {fired}"


def test_each_positive_is_found_by_its_own_detector_first():
    """With every detector on, a sample is named for its own kind (the header and the counts
    say what was found), never left half unmasked."""
    everything = scanner(*NAMES)
    for name, samples in POSITIVE.items():
        for text, secret in samples:
            counts: dict[str, int] = {}
            masked = everything.mask(text, counts)
            assert masked is not None and secret not in masked, (name, text)
            assert name in counts, (name, text, counts)


def _strings(value, out):
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)


def _project_texts() -> list[tuple[str, str]]:
    from mitmproxy import io  # the corpus is a mitmproxy flow file

    texts = []
    with open(ROOT / "tests/flows/corpus.mitm", "rb") as f:
        for flow in io.FlowReader(f).stream():
            for message in (flow.request, flow.response):
                if message is None or not message.raw_content:
                    continue
                raw = message.get_content(strict=False).decode("utf-8", "replace")
                texts.append((f"corpus.mitm {flow.request.path}", raw))
                try:
                    strings: list[str] = []
                    _strings(json.loads(raw), strings)
                    texts.extend((f"corpus.mitm {flow.request.path}", s) for s in strings)
                except ValueError:
                    pass
    docs = [p for p in glob.glob(str(ROOT / "docs/*.md")) if not p.endswith("guardrails.md")]  # (its examples fire)
    paths = glob.glob(str(ROOT / "tests/fixtures/*")) + docs + [str(ROOT / "README.md")]
    paths += [p for p in glob.glob(str(ROOT / "addon/**/*.py"), recursive=True) if "/guard/" not in p]
    if RECORDED.is_dir():  # (shared reference traffic; absent on a machine without it)
        paths += glob.glob(str(RECORDED / "*/*"))
    for path in paths:
        if os.path.isfile(path):
            texts.append((os.path.relpath(path, ROOT), Path(path).read_text(errors="replace")))
    return texts


def test_no_false_positive_on_the_projects_own_traffic_docs_and_code():
    everything = scanner(*NAMES)
    texts = _project_texts()
    assert len(texts) > 100 and sum(len(t) for _, t in texts) > 500_000  # the corpus is really read
    fired = [(where, name) for where, text in texts for _, _, name in everything.spans(text)]
    assert not fired, fired
