"""No import circles between keybroker's modules (docs/architecture.md): every module-level
import, TYPE_CHECKING blocks included, forms a graph without cycles. Importing ``a.b.c``
also runs ``a/__init__`` and ``a/b/__init__``, so those are edges too. An import circle is
a missing interface; TYPE_CHECKING must not be used to hide one."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "keystore")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports at module level (not inside functions)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)  # TYPE_CHECKING and try/except ImportError blocks count
                visit(node.orelse)
                continue
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                # The target and the packages above it run; our own ancestors are running.
                while target:
                    if target != name and not name.startswith(target + "."):
                        found.add(target)
                    target = target.rpartition(".")[0]

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)) is not None:
            return cycle
    return None


def test_there_is_no_import_circle() -> None:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert len(graph) > 40  # the scan found the code
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_keystore_does_not_depend_on_the_broker() -> None:
    """broker/ reads the keystore only through its API; the keystore imports nothing of
    broker/ (the topic grammar both use lives in keystore.topics)."""
    known = modules()
    for name, path in known.items():
        if name.startswith("keystore"):
            assert not any(m.startswith("broker") for m in imports_of(name, path, known)), name


# The packages from the bottom up (docs/architecture.md): each imports only from those
# below it (and itself). The keystore knows nothing of the broker; the rules (topics,
# policy) are pure; core is what every part uses (settings, audit log, counters,
# background services); http serves HTTP for the API and authsvc; mqtt is the MQTT
# engine; state keeps the engine's state across restarts; services run beside the
# engine (change watcher, pruning, metrics); then the management plane (HTTP API, the
# console mounted on it, the cluster service), the daemon that puts them together, and
# the CLI.
LAYERS = ("keystore", "broker.topics", "broker.policy", "broker.core", "broker.http",
          "broker.mqtt", "broker.state", "broker.services", "broker.api", "broker.console",
          "broker.authsvc", "broker.daemon", "broker.cli")


def layer_of(module: str) -> int | None:
    for index, package in enumerate(LAYERS):
        if module == package or module.startswith(package + "."):
            return index
    return None


def test_every_module_lives_in_a_layer() -> None:
    unplaced = [name for name in modules() if name != "broker" and layer_of(name) is None]
    assert unplaced == []


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a module in a higher layer than the importer's."""
    found = []
    for name, targets in sorted(graph.items()):
        low = layer_of(name)
        for target in sorted(targets):
            high = layer_of(target)
            if low is not None and high is not None and high > low:
                found.append(f"{name} -> {target}")
    return found


def test_no_package_imports_one_above_it() -> None:
    known = modules()
    assert upward({name: imports_of(name, path, known) for name, path in known.items()}) == []


def test_the_layer_check_sees_an_upward_import() -> None:
    assert upward({"broker.mqtt.routing": {"broker.api.server", "broker.core.audit"},
                   "keystore.store": {"broker.core.settings"}}) == [
        "broker.mqtt.routing -> broker.api.server", "keystore.store -> broker.core.settings"]
