"""The layers of addon/, enforced from the source: each package imports only from layers below it,
the import graph has no circle, and only the hook layers import mitmproxy (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ADDON = Path(__file__).resolve().parents[2] / "addon"

# bottom to top; a package may import its own modules and any package of a lower layer
LAYERS = (
    ("wire",),  # L0 the ground: bytes, SSE, error bodies, secrets, token counts
    ("providers",),  # L1 where each provider is and how its key is sent
    ("apis",),  # L2 the inbound APIs: paths, checks, error shapes, usage readers
    ("translate", "guard"),  # L3 pure pairs between two APIs; guardrails over each API's text
    ("policy",),  # L4 keys, limits, stores, targets, owners: pure
    ("usage", "routing"),  # L5 the ledger; pure routing (routes, request preparation)
    ("recording", "web", "hooks"),  # L6 mitmproxy addons and patches (not each other)
    ("gateway",),  # L7 the list of parts, in order
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
MITMPROXY_ALLOWED = frozenset({"recording", "web", "hooks", "gateway"})


def module_name(path: Path) -> str:
    parts = path.relative_to(ADDON.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, type-checking and function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ADDON.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules} | {m for m in imports(path) if m.startswith("mitmproxy")}
            for name, path in modules.items()}


def package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_package_has_a_layer():
    packages = {package(m) for m in graph() if m != "addon"}
    assert packages <= set(RANK), f"packages without a layer: {packages - set(RANK)}"


def test_no_import_reaches_up_or_sideways():
    wrong = []
    for module, targets in graph().items():
        if module == "addon":
            continue
        for target in targets:
            if target.startswith("mitmproxy") or target == "addon":
                continue
            here, there = package(module), package(target)
            if here != there and RANK[there] >= RANK[here]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports from a layer that is not below:\n" + "\n".join(sorted(wrong))


def test_mitmproxy_only_in_the_hook_layers():
    wrong = sorted(f"{m} -> {t}" for m, ts in graph().items() for t in ts
                   if t.startswith("mitmproxy") and package(m) not in MITMPROXY_ALLOWED)
    assert not wrong, "mitmproxy imported below the hooks:\n" + "\n".join(wrong)


def test_no_circles():
    edges = {m: {t for t in ts if not t.startswith("mitmproxy") and t != "addon"} for m, ts in graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checks_see_a_back_arrow(tmp_path, monkeypatch):
    """The layer check itself: a wire module importing policy is reported."""
    fake = tmp_path / "addon"
    (fake / "wire").mkdir(parents=True)
    (fake / "policy").mkdir()
    (fake / "wire" / "x.py").write_text("from addon.policy import y\n")
    (fake / "policy" / "y.py").write_text("from addon.wire import x\n")
    import sys
    monkeypatch.setattr(sys.modules[__name__], "ADDON", fake)
    try:
        test_no_import_reaches_up_or_sideways()
    except AssertionError as e:
        assert "addon.wire.x -> addon.policy.y" in str(e)
    else:
        raise AssertionError("the back-arrow went unseen")
    try:
        test_no_circles()
    except AssertionError as e:
        assert "addon.policy.y" in str(e) and "addon.wire.x" in str(e)
    else:
        raise AssertionError("the circle went unseen")
