"""A full disk under a real `soldout serve`: the process stays up, its clients stay
connected, the shards that cannot commit answer `unavailable` and say so in `stats`, and
once space returns they serve again with nothing acknowledged lost. (The fault handling
itself is tested in-process in tests/test_disk_faults.py.)
"""

from __future__ import annotations

from pathlib import Path

import trio
from test_disk_faults import fill, small_filesystem
from wire_helpers import (
    ADMIN_TOKEN,
    exchange,
    open_raw,
    reserve_map,
    run_server_process,
    stop_with_signal,
    write_config,
)

SKU = "MI-BAND-1"


async def test_a_full_disk_does_not_take_the_server_down(tmp_path: Path) -> None:
    mount_point = tmp_path / "small"
    with small_filesystem(mount_point, 4 * 1024 * 1024) as mounted:
        assert mounted, "the test mounts a tmpfs, which needs root (CI runs as root)"
        config = write_config(
            tmp_path / "sale.toml",
            f"""
[server]
port = 0
metrics_port = 0
[engine]
shards = 2
data_dir = "{mount_point / "data"}"
[auth]
admin_tokens = ["{ADMIN_TOKEN}"]
[[sku]]
id = "{SKU}"
stock = 1000000
per_buyer_limit = 1000000
""",
        )
        async with run_server_process(["--config", config], tmp_path / "stderr.txt") as server:
            async with open_raw(server.url, ADMIN_TOKEN) as websocket:
                first = await exchange(websocket, reserve_map(1, SKU, "u", key="first"))
                assert first["status"] == "ok"
                fill(mount_point / "filler")
                statuses = set()
                acknowledged = {"first": first["reservation"]}
                for number in range(2, 2000):
                    reply = await exchange(websocket, reserve_map(number, SKU, "u", key=f"k{number}"))
                    statuses.add(reply["status"])
                    if reply["status"] == "ok":
                        acknowledged[f"k{number}"] = reply["reservation"]
                    else:
                        break
                assert statuses == {"ok", "unavailable"} or statuses == {"unavailable"}
                # Still connected, still answering: stats tell which shard is out.
                stats = (await exchange(websocket, {"id": 5000, "op": "stats"}))["stats"]
                assert "unavailable" in {shard["state"] for shard in stats["shards"]}
                assert (await exchange(websocket, {"id": 5001, "op": "ping"}))["status"] == "ok"
                (mount_point / "filler").unlink()
                with trio.fail_after(30):
                    while True:
                        stats = (await exchange(websocket, {"id": 5002, "op": "stats"}))["stats"]
                        if {shard["state"] for shard in stats["shards"]} == {"serving"}:
                            break
                        await trio.sleep(0.05)
                for number, (key, reservation) in enumerate(acknowledged.items(), start=6000):
                    again = await exchange(websocket, reserve_map(number, SKU, "u", key=key))
                    assert (again["status"], again["reservation"]) == ("ok", reservation)
            assert await stop_with_signal(server) == 0
        stderr = (tmp_path / "stderr.txt").read_text()
        assert "Traceback" not in stderr, stderr
        assert "journal commit failed" in stderr
