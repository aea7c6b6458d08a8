"""Regenerate the regression corpus from the project's own fake providers.

    .venv/bin/python -m tests.flows.regenerate      (from the repository root)

Records every scenario in tests/flows/scenarios.py through a real gateway (mitmdump +
addon/gateway.py, recording on) into tests/flows/corpus.mitm, and writes the fake keys file the
corpus replays with (tests/flows/corpus-keys.json). Re-run it after a deliberate change of the gateway's
output, check `git diff --stat` and the replay (`KEYS_FILE=tests/flows/corpus-keys.json ./run.sh replay
tests/flows/corpus.mitm`), and commit both files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.fakeprovider import FakeProvider
from tests.flows import scenarios
from addon.recording.process import GatewayProcess

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.mitm"
KEYS = HERE / "corpus-keys.json"


def record(out: Path) -> None:
    """Record all scenarios into `out` (replacing it)."""
    if out.exists():
        os.remove(out)  # the recorder appends
    provider = FakeProvider().start()
    try:
        gateway = GatewayProcess(scenarios.keys_for(provider.url), ["--set", f"record_file={out}"]).start()
        try:
            scenarios.run(gateway.url, provider)
        finally:
            gateway.stop()
    finally:
        provider.stop()


def main() -> None:
    record(CORPUS)
    KEYS.write_text(json.dumps(scenarios.KEYS, indent=2) + "\n")
    print(f"wrote {CORPUS.relative_to(HERE.parent.parent)} ({len(scenarios.SCENARIOS)} flows) and {KEYS.name}")


if __name__ == "__main__":
    main()
