"""The cluster bench: the driver's `unavailable` retries and its re-sends after a lost
connection (sans-IO), the cluster flags' errors, and two small real runs of
`soldout bench flash --cluster` over the bench's own three NATS servers: kill -9 of the
hot SKU's owner mid-run (`make demo-cluster` at a small size), and the gateway/owner
split (the crowd only to the node that does not own its shard). Each run's figures must
agree with each other, its checks pass, and every process it started must be gone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import cli
from bench.driver import OK, RESERVE_OP, UNAVAILABLE, ConnectionWork, Tally, crowd_items
from bench.scenarios import build_scenario
from protocol.client_core import unavailable_retry_pause_seconds
from protocol.limits import CLIENT_UNAVAILABLE_RETRIES_MAX, CLIENT_UNAVAILABLE_RETRY_SECONDS


def work_for(buyers: int, batch: int = 2, inflight: int = 10) -> ConnectionWork:
    scenario = build_scenario("flash", buyers=buyers, stock=5, seed=1)
    plan = scenario.plan()
    return ConnectionWork(
        crowd_items(plan, range(buyers)),
        plan,
        lambda items, first_id: f"{first_id}:{len(items)}".encode(),
        Tally(100.0),
        batch=batch,
        inflight=inflight,
        rate=None,
        duration_seconds=None,
    )


def test_an_unavailable_reserve_goes_again_after_a_growing_pause_with_the_same_key() -> None:
    work = work_for(buyers=2)
    batch = work.take(100.0)
    assert batch is not None
    work.answered(batch, [(UNAVAILABLE, None, None), (OK, "0-1", 4)], 100.01)
    # Not at once: after the first pause.
    assert work.take(100.01) is None
    assert not work.finished
    assert work.wake_at() == pytest.approx(100.01 + CLIENT_UNAVAILABLE_RETRY_SECONDS)
    retry = work.take(100.01 + CLIENT_UNAVAILABLE_RETRY_SECONDS)
    assert retry is not None
    # The same request: same buyer, same SKU, so the same idempotency key on the wire.
    assert list(retry.items) == [batch.items[0]]
    work.answered(retry, [(UNAVAILABLE, None, None)], 100.2)
    assert work.wake_at() == pytest.approx(100.2 + unavailable_retry_pause_seconds(2))
    again = work.take(100.2 + unavailable_retry_pause_seconds(2))
    assert again is not None
    work.answered(again, [(OK, "0-0", 3)], 100.5)
    assert work.finished
    tally = work.tally
    assert tally.statuses[RESERVE_OP] == {UNAVAILABLE: 2, OK: 2}
    assert (tally.unavailable_retries, tally.unavailable_unresolved) == (2, 0)
    assert tally.crowd_answered == 2
    assert sorted(tally.holds) == [(0, 0, "0-0"), (0, 1, "0-1")]
    # Each request timed once, the retried one from its first send: 0.5 s.
    assert tally.histogram.get_total_count() == 2
    assert tally.histogram.get_max_value() == pytest.approx(500_000, rel=0.01)


def test_an_unavailable_reserve_is_given_up_after_the_last_try() -> None:
    work = work_for(buyers=1, batch=1)
    now = 100.0
    batch = work.take(now)
    for _ in range(CLIENT_UNAVAILABLE_RETRIES_MAX):
        assert batch is not None
        work.answered(batch, [(UNAVAILABLE, None, None)], now)
        wake = work.wake_at()
        assert wake is not None
        now = wake
        batch = work.take(now)
    assert batch is not None
    work.answered(batch, [(UNAVAILABLE, None, None)], now)
    assert work.finished
    assert work.wake_at() is None
    tally = work.tally
    assert tally.unavailable_retries == CLIENT_UNAVAILABLE_RETRIES_MAX
    assert tally.unavailable_unresolved == 1
    assert tally.crowd_answered == 1
    assert tally.holds == []
    # The pauses grew as the clients' do: 0.1 s, 0.2 s, 0.4 s, ... 2 s, about 13 s in all.
    pauses = sum(unavailable_retry_pause_seconds(tries) for tries in range(1, CLIENT_UNAVAILABLE_RETRIES_MAX + 1))
    assert pauses == pytest.approx(13.1)
    assert now == pytest.approx(100.0 + pauses)


def test_a_lost_connections_requests_go_first_on_the_next_one() -> None:
    work = work_for(buyers=6, batch=2, inflight=4)
    first = work.take(100.0)
    second = work.take(100.0)
    assert first is not None
    assert second is not None
    assert work.take(100.0) is None  # the window is full
    work.connection_lost([second, first], 100.1)
    assert work.inflight == 0
    again = work.take(100.2)
    assert again is not None
    assert list(again.items) == list(first.items)  # in the order they were first sent
    assert again.first_id > second.first_id  # new ids on the new connection
    then = work.take(100.2)
    assert then is not None
    assert list(then.items) == list(second.items)
    for batch in (again, then):
        work.answered(batch, [(OK, f"0-{item[1]}", 1) for item in batch.items], 100.3)
    last = work.take(100.3)
    assert last is not None
    work.answered(last, [("sold_out", None, None)] * len(last.items), 100.3)
    assert work.finished
    assert work.tally.resent_after_loss == 4
    assert work.tally.crowd_answered == 6
    # The re-sent requests are timed from their first send.
    assert work.tally.histogram.get_max_value() == pytest.approx(300_000, rel=0.01)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--cluster", "1", "--kill-owner-after", "1"], "needs a second owner"),
        (["--spawn", "--split-roles"], "--split-roles needs --cluster N"),
        (["--cluster", "1", "--split-roles"], "--split-roles sends the crowd to the nodes not owning its shard"),
        (["--cluster", "2", "--spawn"], "leave out --spawn"),
        (["--cluster", "2", "--durable"], "leave out --durable"),
        (["catalog", "--cluster", "2"], "--cluster runs the flash scenario"),
        (["--cluster", "0"], "--cluster must be at least 1"),
        (["--cluster", "2", "--kill-owner-after", "0"], "--kill-owner-after must be above 0"),
    ],
)
def test_cluster_flags_that_do_not_fit_are_refused_with_a_reason(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(arguments) == 2
    assert message in capsys.readouterr().err


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def run_cluster_bench(tmp_path: Path, arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    report_path = tmp_path / "report.json"
    code = cli.main(["flash", *arguments, "--quiet", "--json", str(report_path)])
    output = capsys.readouterr()
    assert code == 0, output
    document = json.loads(report_path.read_text())
    (run,) = document["runs"]
    # Every process the run started is gone: the nodes and the NATS servers.
    pids = [node["pid"] for node in run["cluster"]["nodes"]] + run["cluster"]["nats_pids"]
    assert len(pids) == len(run["cluster"]["nodes"]) + 3
    assert [pid for pid in pids if not gone(pid)] == []
    assert document["passed"] is True
    return run, output.out


@pytest.mark.slow
def test_kill_9_of_the_hot_skus_owner_mid_sale_sells_every_unit_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--cluster", "2", "--buyers", "3000", "--stock", "1000", "--rate", "1000", "--batch", "10"]
    run, output = run_cluster_bench(tmp_path, [*arguments, "--kill-owner-after", "1"], capsys)
    reserve = run["statuses"]["reserve"]
    # Every unit sold exactly once: ok == stock, the rest sold out, every buyer answered.
    assert reserve[OK] == 1000
    assert reserve["sold_out"] == 2000
    assert run["requests_answered"] == 3000
    # The shard had no owner for a while: reserves were answered unavailable and sent again.
    assert reserve[UNAVAILABLE] == run["unavailable_retries"] > 0
    assert run["unavailable_unresolved"] == 0
    names = [check["name"] for check in run["checks"] if check["passed"]]
    assert "every acknowledged hold present (its 1,000 keys sent again: the same reservation)" in names
    assert "every request answered unavailable decided on a retry" in names
    failover = run["failover"]
    killed = failover["killed_node"]
    survivor = next(node["name"] for node in run["cluster"]["nodes"] if node["name"] != killed)
    assert failover["error"] is None
    assert failover["hot_shard"] in failover["owners_before"][killed]
    assert failover["its_shards"] == failover["owners_before"][killed]
    assert failover["owners_after"] == {survivor: list(range(8))}
    assert failover["hot_shard_answered_after_ms"] > 0
    assert failover["all_its_shards_answered_after_ms"] >= failover["hot_shard_answered_after_ms"]
    assert run["journal"]["commits"] > 0
    assert set(run["cpu_by_role"]) == {"node", "nats"}
    assert f"killed {killed} (kill -9) 1 s into the run" in output
    assert "failover: the hot SKU's shard answered again" in output


@pytest.mark.slow
def test_with_the_roles_split_the_hot_shards_owner_takes_no_client_traffic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Enough buyers that each side of the split runs for many of /proc's 10 ms CPU ticks.
    arguments = ["--cluster", "2", "--split-roles", "--buyers", "20000", "--stock", "500"]
    run, output = run_cluster_bench(tmp_path, arguments, capsys)
    assert run["statuses"]["reserve"] == {OK: 500, "sold_out": 19500}
    cluster = run["cluster"]
    hot_owner = cluster["owners_before"][str(run["cluster"]["hot_shard"])]
    assert [node["name"] for node in cluster["nodes"] if node["role"] == "owner"] == [hot_owner]
    (gateway,) = cluster["crowd_nodes"]
    assert gateway != hot_owner
    assert run["failover"] is None
    roles = run["cpu_by_role"]
    assert set(roles) == {"owner", "gateway", "nats"}
    assert roles["gateway"]["seconds"] > 0
    assert roles["owner"]["seconds"] > 0
    assert roles["nats"]["seconds"] >= 0  # the few commits of 500 holds may fit in one tick
    assert run["server_cpu_seconds"] == pytest.approx(sum(figures["seconds"] for figures in roles.values()), abs=0.01)
    assert run["journal"]["commits"] > 0
    assert run["journal"]["kind"] == "replicated JetStream publish, R3"
    assert "CPU by role: gateway side (the crowd's nodes)" in output
