"""The server's config file: what it reads, what it refuses (always naming the key), how
flags override it, and `soldout serve` stopping on a bad file.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from engine.cli.main import main
from engine.server.config import (
    ConfigError,
    ServerConfig,
    SkuSettings,
    load_server_config,
    parse_server_config,
    with_overrides,
)
from protocol.limits import Limits

# The example of the wire issue, as a frontend team would copy it.
EXAMPLE = """
[server]
host = "127.0.0.1"
port = 8765
metrics_port = 9765
[engine]
shards = 8
data_dir = "data"        # omit for memory only
durable = true
[auth]
frontend_tokens = ["front-secret"]
admin_tokens = ["admin-secret"]
[[sku]]
id = "MI-BAND-1"
stock = 10000
per_buyer_limit = 1
hold_seconds = 900
"""

TOKENS = {"auth": {"frontend_tokens": ["front"], "admin_tokens": ["admin"]}}


def test_the_example_file_reads_as_written() -> None:
    config = parse_server_config(tomllib.loads(EXAMPLE))
    assert (config.host, config.port, config.metrics_port) == ("127.0.0.1", 8765, 9765)
    assert (config.engine.shards, config.engine.data_dir, config.engine.durable) == (8, "data", True)
    assert (config.frontend_tokens, config.admin_tokens) == (("front-secret",), ("admin-secret",))
    assert config.skus == (SkuSettings("MI-BAND-1", stock=10_000, per_buyer_limit=1, hold_seconds=900),)
    assert config.limits == Limits()
    assert not config.open_access


def test_an_empty_file_gives_the_defaults() -> None:
    config = parse_server_config({})
    assert (config.host, config.port, config.metrics_port) == ("127.0.0.1", 8765, 9765)
    assert (config.engine.shards, config.engine.data_dir, config.engine.durable) == (8, None, True)
    assert (config.frontend_tokens, config.admin_tokens, config.skus) == ((), (), ())
    assert config.shutdown_grace_seconds == 10.0
    assert config.open_access
    assert config.limits == Limits()
    defaults = Limits()
    assert (defaults.frame_bytes_max, defaults.batch_requests_max, defaults.inflight_requests_max) == (
        1_048_576,
        1000,
        10_000,
    )
    assert (defaults.string_bytes_max, defaults.connections_max) == (256, 10_000)
    assert (defaults.handshake_seconds_max, defaults.handshakes_max) == (5, 1000)
    # A connection's share of the server's bytes in flight: sixteen that never read fill it.
    assert (defaults.server_inflight_bytes_max, defaults.inflight_bytes_max) == (256 * 2**20, 16 * 2**20)
    assert config.metrics_host == "127.0.0.1"
    assert not config.metrics_token_required


def test_a_connections_bytes_in_flight_follow_the_servers_unless_set() -> None:
    follows = parse_server_config({"limits": {"server_inflight_bytes_max": 32 * 2**20}}).limits
    assert follows.inflight_bytes_max == 2 * 2**20
    both = {"server_inflight_bytes_max": 32 * 2**20, "inflight_bytes_max": 8 * 2**20}
    assert parse_server_config({"limits": both}).limits.inflight_bytes_max == 8 * 2**20


def test_metrics_beyond_loopback_need_an_admin_token() -> None:
    elsewhere = {"server": {"metrics_host": "0.0.0.0"}}
    config = parse_server_config({**elsewhere, **TOKENS})
    assert (config.metrics_host, config.metrics_token_required) == ("0.0.0.0", True)
    # Without a port there is nothing to guard.
    portless = parse_server_config({"server": {"metrics_host": "0.0.0.0", "metrics_port": False}})
    assert not portless.metrics_token_required
    with pytest.raises(ConfigError, match=r"server\.metrics_host"):
        parse_server_config(elsewhere)
    with pytest.raises(ConfigError, match=r"auth\.admin_tokens is empty"):
        parse_server_config({**elsewhere, "auth": {"frontend_tokens": ["front"]}})


def test_the_limits_table_sets_every_bound() -> None:
    values = {field.name: 7 + index for index, field in enumerate(fields(Limits))}
    config = parse_server_config({"limits": values})
    assert config.limits == Limits(**values)
    assert config.engine.limits is config.limits


def test_optional_settings_take_their_values() -> None:
    config = parse_server_config(
        {
            "server": {"metrics_port": False, "port": 0, "shutdown_grace_seconds": 2.5},
            "engine": {"durable": False, "snapshot_records_min": 10},
            "sku": [
                {"id": "A", "stock": 0},
                {
                    "id": "B",
                    "stock": 5,
                    "per_buyer_limit": 2,
                    "hold_seconds": 0.5,
                    "opens_at": 1_700_000_000,
                    "closes_at": 1_700_000_060.5,
                    "registration_required": True,
                },
            ],
        }
    )
    assert (config.metrics_port, config.port, config.shutdown_grace_seconds) == (None, 0, 2.5)
    assert (config.engine.durable, config.engine.snapshot_records_min) == (False, 10)
    assert config.skus == (
        SkuSettings("A", 0),
        SkuSettings("B", 5, 2, 0.5, 1_700_000_000, 1_700_000_060.5, True),
    )


BAD_SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown table", {"serve": {}}, "serve"),
    ("unknown server key", {"server": {"prot": 1}}, "server.prot"),
    ("unknown engine key", {"engine": {"shard": 2}}, "engine.shard"),
    ("unknown auth key", {"auth": {"tokens": ["x"]}}, "auth.tokens"),
    ("unknown limit", {"limits": {"frame_bytes": 1}}, "limits.frame_bytes"),
    ("unknown sku key", {"sku": [{"id": "A", "stock": 1, "price": 2}]}, "sku[0].price"),
    ("server not a table", {"server": "x"}, "server"),
    ("port as text", {"server": {"port": "8765"}}, "server.port"),
    ("port as bool", {"server": {"port": True}}, "server.port"),
    ("port too high", {"server": {"port": 70_000}}, "server.port"),
    ("port negative", {"server": {"port": -1}}, "server.port"),
    ("host as number", {"server": {"host": 1}}, "server.host"),
    ("metrics port as text", {"server": {"metrics_port": "x"}}, "server.metrics_port"),
    ("metrics port as true", {"server": {"metrics_port": True}}, "server.metrics_port"),
    ("metrics port too high", {"server": {"metrics_port": 65_536}}, "server.metrics_port"),
    ("no shutdown grace", {"server": {"shutdown_grace_seconds": 0}}, "server.shutdown_grace_seconds"),
    ("no shards", {"engine": {"shards": 0}}, "engine.shards"),
    ("too many shards", {"engine": {"shards": 1025}}, "engine.shards"),
    ("shards as bool", {"engine": {"shards": True}}, "engine.shards"),
    ("shards as float", {"engine": {"shards": 2.0}}, "engine.shards"),
    ("durable as text", {"engine": {"durable": "yes"}}, "engine.durable"),
    ("durable as int", {"engine": {"durable": 1}}, "engine.durable"),
    ("data dir as number", {"engine": {"data_dir": 5}}, "engine.data_dir"),
    ("empty data dir", {"engine": {"data_dir": ""}}, "engine.data_dir"),
    ("no snapshots", {"engine": {"snapshot_records_min": 0}}, "engine.snapshot_records_min"),
    ("tokens as text", {"auth": {"frontend_tokens": "front"}}, "auth.frontend_tokens"),
    ("empty token", {"auth": {"admin_tokens": [""]}}, "auth.admin_tokens"),
    ("token as number", {"auth": {"admin_tokens": [5]}}, "auth.admin_tokens"),
    ("token in both roles", {"auth": {"frontend_tokens": ["t"], "admin_tokens": ["t"]}}, "auth"),
    ("zero limit", {"limits": {"frame_bytes_max": 0}}, "limits.frame_bytes_max"),
    ("limit as text", {"limits": {"batch_requests_max": "10"}}, "limits.batch_requests_max"),
    ("limit as bool", {"limits": {"string_bytes_max": True}}, "limits.string_bytes_max"),
    ("sku not an array", {"sku": {"id": "A", "stock": 1}}, "sku"),
    ("sku not a table", {"sku": ["A"]}, "sku[0]"),
    ("sku without id", {"sku": [{"stock": 1}]}, "sku[0].id"),
    ("sku without stock", {"sku": [{"id": "A"}]}, "sku[0].stock"),
    ("empty sku id", {"sku": [{"id": "", "stock": 1}]}, "sku[0].id"),
    ("long sku id", {"sku": [{"id": "é" * 129, "stock": 1}]}, "sku[0].id"),
    ("sku id as number", {"sku": [{"id": 5, "stock": 1}]}, "sku[0].id"),
    ("sku twice", {"sku": [{"id": "A", "stock": 1}, {"id": "A", "stock": 2}]}, "sku[1].id"),
    ("negative stock", {"sku": [{"id": "A", "stock": -1}]}, "sku[0].stock"),
    ("stock as text", {"sku": [{"id": "A", "stock": "10"}]}, "sku[0].stock"),
    ("stock over the bound", {"sku": [{"id": "A", "stock": 1_000_000_001}]}, "sku[0].stock"),
    ("no per-buyer units", {"sku": [{"id": "A", "stock": 1, "per_buyer_limit": 0}]}, "sku[0].per_buyer_limit"),
    ("per-buyer float", {"sku": [{"id": "A", "stock": 1, "per_buyer_limit": 1.5}]}, "sku[0].per_buyer_limit"),
    ("no hold time", {"sku": [{"id": "A", "stock": 1, "hold_seconds": 0}]}, "sku[0].hold_seconds"),
    ("hold time as text", {"sku": [{"id": "A", "stock": 1, "hold_seconds": "900"}]}, "sku[0].hold_seconds"),
    ("opens as text", {"sku": [{"id": "A", "stock": 1, "opens_at": "noon"}]}, "sku[0].opens_at"),
    (
        "closes before it opens",
        {"sku": [{"id": "A", "stock": 1, "opens_at": 100, "closes_at": 100}]},
        "sku[0].closes_at",
    ),
    (
        "registration as text",
        {"sku": [{"id": "A", "stock": 1, "registration_required": "yes"}]},
        "sku[0].registration_required",
    ),
    ("second sku wrong", {"sku": [{"id": "A", "stock": 1}, {"id": "B", "stock": 1.5}]}, "sku[1].stock"),
    ("open on every interface", {"server": {"host": "0.0.0.0"}}, "server.host"),
    ("metrics host as number", {"server": {"metrics_host": 1}}, "server.metrics_host"),
    (
        "in flight below a batch",
        {"limits": {"inflight_requests_max": 999}},
        "limits.inflight_requests_max (999) is below limits.batch_requests_max (1000)",
    ),
    (
        "a connection's bytes over the server's",
        {"limits": {"inflight_bytes_max": 2048, "server_inflight_bytes_max": 1024}},
        "limits.inflight_bytes_max",
    ),
    ("no handshake time", {"limits": {"handshake_seconds_max": 0}}, "limits.handshake_seconds_max"),
    ("no handshakes", {"limits": {"handshakes_max": 0}}, "limits.handshakes_max"),
]


@pytest.mark.parametrize(
    ("document", "named"), [pytest.param(document, named, id=what) for what, document, named in BAD_SETTINGS]
)
def test_a_bad_setting_is_refused_naming_its_key(document: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_server_config(document)
    assert named in str(refused.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_no_tokens_is_fine_on_loopback(host: str) -> None:
    config = parse_server_config({"server": {"host": host}})
    assert config.open_access
    config.check_bind_address()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "example.com"])
def test_a_server_open_to_the_network_needs_tokens(host: str) -> None:
    assert parse_server_config({"server": {"host": host}, **TOKENS}).host == host
    with pytest.raises(ConfigError, match=r"server\.host"):
        parse_server_config({"server": {"host": host}})
    with pytest.raises(ConfigError, match=r"server\.host"):
        ServerConfig(host=host).check_bind_address()


def test_flags_given_win_and_flags_not_given_change_nothing() -> None:
    config = parse_server_config(tomllib.loads(EXAMPLE))
    assert with_overrides(config) == config
    changed = with_overrides(config, host="::1", port=0, shards=3, data_dir="elsewhere", metrics_port=0)
    assert (changed.host, changed.port, changed.metrics_port) == ("::1", 0, 0)
    assert (changed.engine.shards, changed.engine.data_dir) == (3, "elsewhere")
    assert (changed.engine.durable, changed.skus, changed.admin_tokens) == (True, config.skus, config.admin_tokens)
    assert changed.metrics_host == config.metrics_host
    assert with_overrides(config, metrics_host="0.0.0.0").metrics_host == "0.0.0.0"


def test_flags_are_checked_as_the_file_is() -> None:
    with pytest.raises(ConfigError, match="--shards"):
        with_overrides(ServerConfig(), shards=0)
    with pytest.raises(ConfigError, match=r"server\.host"):
        with_overrides(ServerConfig(), host="0.0.0.0")
    tokens = ServerConfig(frontend_tokens=("front",))
    assert with_overrides(tokens, host="0.0.0.0").host == "0.0.0.0"
    # Metrics off loopback need an admin token to ask for.
    with pytest.raises(ConfigError, match=r"server\.metrics_host"):
        with_overrides(tokens, metrics_host="0.0.0.0")


def test_a_file_is_read_and_a_missing_or_broken_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sale.toml"
    path.write_text(EXAMPLE)
    assert load_server_config(str(path)) == parse_server_config(tomllib.loads(EXAMPLE), base_directory=str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_server_config(str(tmp_path / "missing.toml"))
    path.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_server_config(str(path))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param("[server]\nprot = 8765\n", "server.prot", id="unknown-key"),
        pytest.param('[engine]\nshards = "8"\n', "engine.shards", id="wrong-type"),
        pytest.param('[[sku]]\nid = "A"\nstock = "lots"\n', "sku[0].stock", id="sku-wrong-type"),
        pytest.param("[limits]\nframe_bytes_max = 0\n", "limits.frame_bytes_max", id="limit-value"),
        pytest.param(
            "[limits]\ninflight_requests_max = 10\nbatch_requests_max = 100\n",
            "limits.inflight_requests_max",
            id="inflight-below-batch",
        ),
        pytest.param('[server]\nhost = "0.0.0.0"\n', "server.host", id="open-on-all-interfaces"),
        pytest.param("[server\nport = 1\n", "not valid TOML", id="not-toml"),
    ],
)
def test_soldout_serve_stops_on_a_bad_file_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["serve", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("soldout: config error: ")
    assert named in captured.err
    assert "soldout serving" not in captured.out


def test_soldout_serve_stops_on_a_missing_file_and_on_an_open_host_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(tmp_path / "nowhere.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "0"]) == 2
    assert capsys.readouterr().err.startswith("soldout: config error: server.host")


def test_a_sku_time_may_be_a_toml_date_time_with_an_offset() -> None:
    text = '[[sku]]\nid = "A"\nstock = 5\nopens_at = 2026-12-01T04:30:00+05:30\ncloses_at = 1796083200\n'
    document = tomllib.loads(text)
    (sku,) = parse_server_config(document).skus
    assert (sku.opens_at, sku.closes_at) == (1796079600.0, 1796083200.0)
    # Only the keys the file gives are applied to a SKU that exists.
    assert sku.given() == {"stock": 5, "opens_at": 1796079600.0, "closes_at": 1796083200.0}
    naive = tomllib.loads('[[sku]]\nid = "A"\nstock = 5\nopens_at = 2026-12-01T04:30:00\n')
    with pytest.raises(ConfigError, match=r"sku\[0\]\.opens_at needs a UTC offset"):
        parse_server_config(naive)
