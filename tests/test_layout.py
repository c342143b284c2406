"""The layout shows the architecture: imports run one way, CLI → server layer → engine →
book → protocol, and bench → everything, never the reverse; every bound is in one home.

Read from the source with `ast`, so a test fails on the import itself, wherever it is.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from protocol.limits import Limits

REPOSITORY = Path(__file__).resolve().parent.parent
# The layers, lowest first: a module may import its own layer and the ones below it.
LAYERS = ("protocol", "engine.book", "engine", "engine.server", "engine.cli", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPOSITORY).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The deepest layer whose name `module` is, or lives under."""
    best = ""
    for layer in LAYERS:
        if (module == layer or module.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    return best


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether the import is at the module's top level) of one file."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, id(node) in top_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top_level))
    return found


SOURCES = sorted(path for package in ("protocol", "engine", "bench") for path in (REPOSITORY / package).rglob("*.py"))


def test_the_layers_are_known_and_every_source_file_is_in_one() -> None:
    assert SOURCES
    assert all(layer_of(module_name(path)) for path in SOURCES)
    assert {layer_of(module_name(path)) for path in SOURCES} == set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(REPOSITORY)))
def test_imports_run_one_way(path: Path) -> None:
    module = module_name(path)
    rank = LAYERS.index(layer_of(module))
    for imported, top_level in imports_of(path):
        imported_layer = layer_of(imported)
        if not imported_layer:
            continue  # the standard library or a dependency
        if module == "engine.cli.main" and imported_layer == "bench" and not top_level:
            # `soldout bench` hands its arguments to the bench, imported only when asked
            # for, so that the command works (and says which extra to install) without it.
            continue
        assert LAYERS.index(imported_layer) <= rank, f"{module} ({layer_of(module)}) imports {imported}"


def test_the_book_and_the_pure_parts_import_no_trio() -> None:
    pure = [path for path in SOURCES if layer_of(module_name(path)) in ("protocol", "engine.book")]
    clients = {"protocol.client", "protocol.aio"}
    for path in pure:
        if module_name(path) in clients:
            continue
        imported = {name.split(".")[0] for name, _ in imports_of(path)}
        assert not imported & {"trio", "trio_websocket", "asyncio", "socket", "websockets"}, path


# A bound is a module-level NAME_MAX / NAME_MIN constant, or a number of seconds or bytes.
BOUND = re.compile(r"^([A-Z][A-Z0-9_]*_(MAX|MIN)|[A-Z][A-Z0-9_]*_(SECONDS|BYTES)(_MAX|_MIN)?)\s*(:[^=]*)?=", re.M)
# What may keep such a constant elsewhere: a name bound to one from protocol/limits.py, a
# format's own field sizes, and timings that are not bounds of anyone's input.
LOCAL_CONSTANTS_ALLOWED = {
    "engine/journal.py": {
        "ENTRY_PAYLOAD_BYTES_MAX",
        "TAIL_SCAN_BYTES",
        "SEGMENT_HEADER_BYTES",
        "ENTRY_HEADER_BYTES",
        "LEGACY_HEADER_BYTES",
    },
    "protocol/client_core.py": {
        "BATCH_REQUESTS_MAX",
        "INFLIGHT_REQUESTS_MAX",
        "REPLY_FRAME_BYTES_MAX",
        "RECONNECT_DELAY_SECONDS",
        "RECONNECT_DELAY_STEPS_MAX",
    },
}


@pytest.mark.parametrize(
    "path",
    [path for path in SOURCES if path.parts[-2] != "bench" and path.name != "limits.py"],
    ids=lambda path: str(path.relative_to(REPOSITORY)),
)
def test_bounds_live_in_protocol_limits(path: Path) -> None:
    relative = str(path.relative_to(REPOSITORY))
    allowed = LOCAL_CONSTANTS_ALLOWED.get(relative, set())
    local = {match.group(1) for match in BOUND.finditer(path.read_text())} - allowed
    assert not local, f"{relative} keeps bounds of its own: {sorted(local)}; they belong in protocol/limits.py"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_requests_max": 100, "inflight_requests_max": 99}, "limits.inflight_requests_max (99) is below"),
        (
            {"batch_requests_max": 1000, "shard_batch_commands_max": 999},
            "limits.shard_batch_commands_max (999) is below limits.batch_requests_max (1000)",
        ),
        ({"frame_bytes_max": 2_000_000, "inflight_bytes_max": 1_000_000}, "limits.inflight_bytes_max (1000000)"),
        (
            {"inflight_bytes_max": 3_000_000, "server_inflight_bytes_max": 2_000_000, "frame_bytes_max": 1_000_000},
            "limits.server_inflight_bytes_max (2000000) is below limits.inflight_bytes_max (3000000)",
        ),
        ({"register_buyers_max": 30_000}, "limits.shard_batch_commands_max (20000) is below"),
        ({"qty_max": 10, "stock_max": 5}, "limits.stock_max (5) is below limits.qty_max (10)"),
        ({"frame_bytes_max": 1 << 28, "server_inflight_bytes_max": 1 << 33}, "the journal's entry bound"),
        ({"string_bytes_max": 0}, "limits.string_bytes_max must be a positive integer"),
    ],
)
def test_limits_are_checked_against_each_other_when_made(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Limits(**settings)


def test_the_default_limits_hold_together_and_a_derived_bound_is_filled_in() -> None:
    limits = Limits()
    assert limits.batch_requests_max <= limits.shard_batch_commands_max
    assert limits.inflight_bytes_max == limits.server_inflight_bytes_max // 16
