"""The import rules between layers (docs/architecture.md), read from the source with ast:
every `import` and `from ... import`, at any depth (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "torpor"

# (the layer, what it must never import, why)
RULES = [
    ("torpor.sdk", ("torpor.api", "torpor.engine", "torpor.runtime", "torpor.store",
                    "torpor.network", "torpor.server", "torpor.agent"),
     "the SDK installs and runs without the server's side"),
    ("torpor.integrations", ("torpor.api", "torpor.engine", "torpor.runtime", "torpor.store",
                             "torpor.network", "torpor.server", "torpor.agent",
                             "torpor.channel", "torpor.mcp", "torpor.compat"),
     "an integration is a client: it speaks to the server through the SDK, as the SDK does"),
    ("torpor.agent", ("torpor",),
     "the agent runs inside the sandbox from a read-only bundle: stdlib and its own modules"),
    ("torpor.runtime", ("torpor.engine", "torpor.api", "torpor.cli", "torpor.server",
                        "torpor.sdk"),
     "the runtime is below the engine and never reaches up"),
    ("torpor.store", ("torpor.engine", "torpor.api", "torpor.cli", "torpor.runtime",
                      "torpor.channel"),
     "the state store knows records, not what uses them"),
    ("torpor.api", ("torpor.runtime", "torpor.channel", "torpor.store"),
     "a front door speaks to the engine only: engine methods, engine types, engine errors"),
    ("torpor.mcp", ("torpor.runtime", "torpor.channel", "torpor.store", "torpor.agent"),
     "a front door speaks to the engine only: engine methods, engine types, engine errors"),
    ("torpor.compat", ("torpor.runtime", "torpor.channel", "torpor.store", "torpor.agent",
                       "torpor.api"),
     "a front door speaks to the engine only: engine methods, engine types, engine errors"),
    ("torpor.channel", ("torpor.engine", "torpor.api", "torpor.cli", "torpor.runtime",
                        "torpor.store", "torpor.sdk"),
     "the channel is the host end of the agent's protocol, for any driver: nothing above"),
    ("torpor.engine", ("torpor.api", "torpor.cli", "torpor.sdk", "torpor.server",
                       "torpor.runtime.gvisor", "torpor.runtime.cgroups",
                       "torpor.runtime.layers", "torpor.runtime.holder"),
     "the engine reaches a runtime only through the driver interface (base, driver_for)"),
    ("torpor.templates", ("torpor.engine", "torpor.api", "torpor.runtime", "torpor.store"),
     "templates are data every layer reads"),
    ("torpor.sources", ("torpor.engine", "torpor.api", "torpor.cli", "torpor.runtime",
                        "torpor.store", "torpor.channel", "torpor.server"),
     "template sources fetch root filesystems on the host; the engine's builds call them"),
]
# the engine's parts never import the facade (manager.py) that composes them: no circle
ENGINE_PARTS = [("torpor.engine." + p.stem, ("torpor.engine.manager",),
                 "an engine part takes what it needs as arguments, not the Engine")
                for p in (PACKAGE / "engine").glob("*.py")
                if p.stem not in ("manager", "__init__")]


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, absolute; an agent module's own siblings (imported by
    their bare names, `import miniloop`) come back as those bare names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def violations(rules=RULES) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        for layer, banned, why in rules:
            if mod != layer and not mod.startswith(layer + "."):
                continue
            for imp in imports_of(path):
                if any(imp == b or imp.startswith(b + ".") for b in banned):
                    found.append(f"{mod} imports {imp}: {why}")
    return found


def test_layers_import_only_what_their_rules_allow():
    assert violations() == []


def test_engine_parts_do_not_import_the_engine():
    assert len(ENGINE_PARTS) >= 8
    assert violations(ENGINE_PARTS) == []


def test_the_check_sees_lazy_imports():
    # a rule the code breaks on purpose (the CLI imports the engine lazily, for offline
    # keys) is found, so the check above can fail
    found = violations([("torpor.cli", ("torpor.engine",), "test")])
    assert any(v.startswith("torpor.cli.admin imports torpor.engine") for v in found)
