"""The server's config file (TOML), read into a `ServerConfig`.

Every key is checked: an unknown key, a wrong type or a bad value stops the start with
a `ConfigError` that names the key (`sku[2].stock`, `limits.frame_bytes_max`).
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import tomllib
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Any

from engine.config import EngineConfig
from protocol.limits import Limits
from protocol.messages import UNCHANGED, Unchanged
from protocol.parser import CommandParser

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_METRICS_PORT = 9765


class ConfigError(Exception):
    """The config is not usable; the message names the key."""


@dataclass(frozen=True, slots=True)
class SkuSettings:
    """A [[sku]] of the config file. A setting the file leaves out is UNCHANGED: a SKU the
    file creates takes the default, and --apply-config-skus leaves it as it is."""

    sku: str
    stock: int
    per_buyer_limit: int | Unchanged = UNCHANGED
    hold_seconds: float | Unchanged = UNCHANGED
    opens_at: float | Unchanged | None = UNCHANGED
    closes_at: float | Unchanged | None = UNCHANGED
    registration_required: bool | Unchanged = UNCHANGED

    def given(self) -> dict[str, Any]:
        """The settings the file gives (stock always), as put_sku keyword arguments."""
        names = ("stock", "per_buyer_limit", "hold_seconds", "opens_at", "closes_at", "registration_required")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not UNCHANGED}


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The [cluster] table: this node joins a soldout cluster on NATS JetStream."""

    nats_urls: tuple[str, ...]
    node: str
    replicas: int = 3
    lease_seconds: float = 3.0
    owns_shards: bool = True


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    metrics_port: int | None = DEFAULT_METRICS_PORT
    # /metrics shows every SKU's stock, held and sold: loopback unless asked, and
    # elsewhere only to an admin token (see metrics_token_required).
    metrics_host: str = DEFAULT_HOST
    engine: EngineConfig = field(default_factory=EngineConfig)
    frontend_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    skus: tuple[SkuSettings, ...] = ()
    # The journal is the truth: a [[sku]] that exists keeps its journaled settings and
    # stock unless this asks for the file's values (soldout serve --apply-config-skus).
    apply_config_skus: bool = False
    # How long a shutdown waits for in-flight requests before closing connections anyway.
    shutdown_grace_seconds: float = 10.0
    # Set: this node is one of a cluster, and the journal lives in JetStream, not data_dir.
    cluster: ClusterConfig | None = None

    @property
    def limits(self) -> Limits:
        return self.engine.limits

    @property
    def open_access(self) -> bool:
        """No tokens: every connection is admitted with both roles (loopback only)."""
        return not self.frontend_tokens and not self.admin_tokens

    @property
    def metrics_token_required(self) -> bool:
        """/metrics asks for an admin token: it listens beyond loopback."""
        return self.metrics_port is not None and not is_loopback(self.metrics_host)

    def check_bind_address(self) -> None:
        if self.open_access and not is_loopback(self.host):
            raise ConfigError(
                f"server.host = {self.host!r} is not a loopback address and no tokens are configured: "
                "set auth.frontend_tokens / auth.admin_tokens, or bind to 127.0.0.1"
            )
        if self.metrics_token_required and not self.admin_tokens:
            raise ConfigError(
                f"server.metrics_host = {self.metrics_host!r} is not a loopback address, and there /metrics "
                "needs an admin token, but auth.admin_tokens is empty: add one, or bind the metrics to 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_SECTIONS = {"server", "engine", "auth", "limits", "sku", "cluster"}
_CLUSTER_KEYS = {"nats_urls", "node", "replicas", "lease_seconds", "owns_shards"}
_SERVER_KEYS = {"host", "port", "metrics_host", "metrics_port", "shutdown_grace_seconds"}
_ENGINE_KEYS = {"shards", "data_dir", "durable", "snapshot_records_min"}
_AUTH_KEYS = {"frontend_tokens", "admin_tokens"}
_SKU_KEYS = {"id", "stock", "per_buyer_limit", "hold_seconds", "opens_at", "closes_at", "registration_required"}


def load_server_config(path: str) -> ServerConfig:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    return parse_server_config(document, base_directory=os.path.dirname(os.path.abspath(path)))


def parse_server_config(document: dict[str, Any], *, base_directory: str | None = None) -> ServerConfig:
    """The config in `document`; a relative data_dir is taken relative to `base_directory`
    (the config file's directory), so a server reads the same data wherever it starts."""
    _no_unknown_keys(document, _SECTIONS, "")
    server = _table(document, "server")
    engine = _table(document, "engine")
    auth = _table(document, "auth")
    limits_table = _table(document, "limits")
    _no_unknown_keys(server, _SERVER_KEYS, "server.")
    _no_unknown_keys(engine, _ENGINE_KEYS, "engine.")
    _no_unknown_keys(auth, _AUTH_KEYS, "auth.")
    _no_unknown_keys(limits_table, set(Limits.field_names()), "limits.")

    host = _get(server, "server.host", str, DEFAULT_HOST)
    metrics_host = _get(server, "server.metrics_host", str, DEFAULT_HOST)
    port = _port(server, "server.port", DEFAULT_PORT, allow_zero=True)
    metrics_port = server.get("metrics_port", DEFAULT_METRICS_PORT)
    if metrics_port is not None and metrics_port is not False:
        metrics_port = _port(server, "server.metrics_port", DEFAULT_METRICS_PORT, allow_zero=True)
    else:
        metrics_port = None
    grace = _get(server, "server.shutdown_grace_seconds", (int, float), 10.0)
    if grace <= 0:
        raise ConfigError("server.shutdown_grace_seconds must be above 0")

    limits_values = {}
    for name, value in limits_table.items():
        if type(value) is not int or value < 1:
            raise ConfigError(f"limits.{name} must be a positive integer, got {value!r}")
        limits_values[name] = value
    try:
        limits = Limits(**limits_values)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    data_dir = _get(engine, "engine.data_dir", str, None)
    if data_dir == "":
        raise ConfigError("engine.data_dir must not be empty (omit it for memory only)")
    if data_dir is not None and base_directory is not None:
        data_dir = os.path.join(base_directory, os.path.expanduser(data_dir))
    durable = _get(engine, "engine.durable", bool, True)
    try:
        # EngineConfig checks the shard count and the snapshot threshold.
        engine_config = EngineConfig(
            shards=engine.get("shards", EngineConfig.shards),
            data_dir=data_dir,
            durable=durable,
            limits=limits,
            snapshot_records_min=engine.get("snapshot_records_min", EngineConfig.snapshot_records_min),
        )
    except ValueError as error:
        raise ConfigError(f"engine.{error}") from None

    frontend_tokens = _tokens(auth, "frontend_tokens")
    admin_tokens = _tokens(auth, "admin_tokens")
    shared = set(frontend_tokens) & set(admin_tokens)
    if shared:
        raise ConfigError("auth: a token is listed as both a frontend and an admin token")

    skus = _skus(document.get("sku", []), limits)
    cluster = _cluster(document["cluster"]) if "cluster" in document else None
    if cluster is not None and data_dir is not None:
        raise ConfigError("engine.data_dir: in cluster mode ([cluster]) the journal and snapshots live in JetStream")
    config = ServerConfig(
        host=host,
        port=port,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        engine=engine_config,
        frontend_tokens=frontend_tokens,
        admin_tokens=admin_tokens,
        skus=skus,
        shutdown_grace_seconds=float(grace),
        cluster=cluster,
    )
    config.check_bind_address()
    return config


def _cluster(table: Any) -> ClusterConfig:
    if not isinstance(table, dict):
        raise ConfigError("cluster must be a table")
    _no_unknown_keys(table, _CLUSTER_KEYS, "cluster.")
    urls = table.get("nats_urls")
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls:
        raise ConfigError("cluster.nats_urls is required: a list of nats:// URLs")
    for url in urls:
        _nats_url(url, "cluster.nats_urls")
    if "node" not in table:
        raise ConfigError("cluster.node is required: this node's name, unique in the cluster")
    node = _get(table, "cluster.node", str, "")
    _node_name(node, "cluster.node")
    replicas = _get(table, "cluster.replicas", int, 3)
    if not 1 <= replicas <= 5:
        raise ConfigError(f"cluster.replicas must be from 1 to 5 (JetStream's limit), got {replicas}")
    lease_seconds = _get(table, "cluster.lease_seconds", (int, float), 3.0)
    if not 0 < lease_seconds <= 600:
        raise ConfigError(f"cluster.lease_seconds must be above 0 and at most 600, got {lease_seconds}")
    owns_shards = _get(table, "cluster.owns_shards", bool, True)
    return ClusterConfig(tuple(urls), node, replicas, float(lease_seconds), owns_shards)


def _nats_url(url: Any, name: str) -> None:
    if not isinstance(url, str):
        raise ConfigError(f"{name} must hold URLs as strings, got {url!r}")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("nats", "tls") or not parsed.hostname:
        raise ConfigError(f"{name}: {url!r} is not a nats://HOST:PORT URL")
    try:
        parsed.port  # noqa: B018 (it raises on a port that is not a number)
    except ValueError:
        raise ConfigError(f"{name}: {url!r} has a port that is not a number") from None


def _node_name(node: str, name: str) -> None:
    # The name is part of NATS subjects and key names: letters, digits, - and _ only.
    if (
        not node
        or len(node) > 64
        or not all(character.isascii() and (character.isalnum() or character in "-_") for character in node)
    ):
        raise ConfigError(f"{name} must be 1 to 64 letters, digits, '-' or '_', got {node!r}")


def with_overrides(
    config: ServerConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    shards: int | None = None,
    data_dir: str | None = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    cluster_urls: str | None = None,
    node: str | None = None,
) -> ServerConfig:
    """Flags given on the command line win over the file; flags not given change nothing."""
    engine = config.engine
    cluster = config.cluster
    if cluster_urls is not None or node is not None:
        urls = tuple(url.strip() for url in cluster_urls.split(",")) if cluster_urls is not None else None
        for url in urls or ():
            _nats_url(url, "--cluster")
        if node is not None:
            _node_name(node, "--node")
        if cluster is None:
            if urls is None or node is None:
                raise ConfigError("--cluster and --node go together when the config has no [cluster] table")
            cluster = ClusterConfig(urls, node)
        else:
            cluster = replace(cluster, nats_urls=urls or cluster.nats_urls, node=node or cluster.node)
    if shards is not None:
        try:
            engine = replace(engine, shards=shards)
        except ValueError as error:
            raise ConfigError(f"--{error}") from None
    if data_dir is not None:
        engine = replace(engine, data_dir=data_dir)
    changed = replace(
        config,
        host=host if host is not None else config.host,
        port=port if port is not None else config.port,
        metrics_port=metrics_port if metrics_port is not None else config.metrics_port,
        metrics_host=metrics_host if metrics_host is not None else config.metrics_host,
        engine=engine,
        cluster=cluster,
    )
    if changed.cluster is not None and changed.engine.data_dir is not None:
        raise ConfigError("--data-dir: in cluster mode the journal and snapshots live in JetStream")
    changed.check_bind_address()
    return changed


def _table(document: dict[str, Any], name: str) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{name} must be a table")
    return table


def _no_unknown_keys(table: dict[str, Any], known: set[str], prefix: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key} is not a known setting (known: {', '.join(sorted(known))})")


def _get(table: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    key = name.rsplit(".", 1)[-1]
    if key not in table:
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a setting that wants a number must not take true.
    if type(value) not in kinds:
        expected = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    return value


def _port(table: dict[str, Any], name: str, default: int, *, allow_zero: bool) -> int:
    port = _get(table, name, int, default)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ConfigError(f"{name} must be a TCP port from 0 to 65535, got {port}")
    return port


def _tokens(auth: dict[str, Any], key: str) -> tuple[str, ...]:
    tokens = auth.get(key, [])
    if not isinstance(tokens, list) or not all(isinstance(token, str) and token for token in tokens):
        raise ConfigError(f"auth.{key} must be a list of non-empty strings")
    return tuple(tokens)


def _time(entry: dict[str, Any], name: str) -> float | Unchanged:
    """Epoch seconds, or a TOML date-time with an offset (opens_at = 2026-12-01T04:30:00+05:30)."""
    key = name.rsplit(".", 1)[-1]
    if key not in entry:
        return UNCHANGED
    value = entry[key]
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ConfigError(f"{name} needs a UTC offset, such as 2026-12-01T04:30:00+05:30 or ...Z")
        return value.timestamp()
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be epoch seconds or a date-time with an offset, got {value!r}")
    return float(value)


def _skus(entries: Any, limits: Limits) -> tuple[SkuSettings, ...]:
    """The [[sku]] tables: each one's settings checked by the parser that checks put_sku's."""
    if not isinstance(entries, list):
        raise ConfigError("sku must be an array of tables ([[sku]])")
    parser = CommandParser(limits)
    skus = []
    seen = set()
    for index, entry in enumerate(entries):
        prefix = f"sku[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{prefix} must be a table")
        _no_unknown_keys(entry, _SKU_KEYS, prefix + ".")
        if "id" not in entry:
            raise ConfigError(f"{prefix}.id is required")
        if "stock" not in entry:
            raise ConfigError(f"{prefix}.stock is required")
        settings = SkuSettings(
            entry["id"],
            entry["stock"],
            entry.get("per_buyer_limit", UNCHANGED),
            entry.get("hold_seconds", UNCHANGED),
            _time(entry, f"{prefix}.opens_at"),
            _time(entry, f"{prefix}.closes_at"),
            entry.get("registration_required", UNCHANGED),
        )
        error = parser.put_sku_error(settings.sku, **settings.given())
        if error:
            # The parser names the field as put_sku does; the file calls the SKU's name `id`.
            field, _, rest = error.partition(" ")
            raise ConfigError(f"{prefix}.{'id' if field == 'sku' else field} {rest}")
        if settings.sku in seen:
            raise ConfigError(f"{prefix}.id {settings.sku!r} appears twice")
        seen.add(settings.sku)
        skus.append(settings)
    return tuple(skus)
