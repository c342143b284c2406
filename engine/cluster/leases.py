"""Who should own which shard: the cluster's lease plan, as a pure function.

Each node keeps a heartbeat key fresh, and a shard's owner holds its lease key (node
and epoch) in a replicated key-value bucket, renewing it with compare-and-set; a lease
that is not renewed expires. From what a node reads there — the owners, the live nodes —
`plan` says what it should do next: take free shards while it holds fewer than its fair
share, and hand off shards while it holds more and another live node holds fewer (so a
node that joins gets work without a restart, and nothing is handed to nobody).

The bucket arbitrates: two nodes that plan to take the same free shard both try a
create, and one of them wins. No I/O and no clock here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Lease:
    """A shard's lease as the bucket holds it: the owning node and the epoch of its ownership."""

    node: str
    epoch: int


@dataclass(frozen=True, slots=True)
class LeasePlan:
    take: tuple[int, ...]  # free shards to try to create a lease for, best first
    hand_off: tuple[int, ...]  # shards of ours to stop serving, commit and release


def fair_shares(shards: int, live_nodes: Collection[str]) -> dict[str, int]:
    """How many shards each live node should own: as even as can be, the larger shares
    going to the nodes first in name order (every node computes the same split)."""
    nodes = sorted(set(live_nodes))
    if not nodes:
        return {}
    base, extra = divmod(shards, len(nodes))
    return {node: base + (index < extra) for index, node in enumerate(nodes)}


def plan(node: str, shards: int, owners: Mapping[int, Lease | None], live_nodes: Collection[str]) -> LeasePlan:
    """What `node` should do, given each shard's lease (None: free) and the live nodes.

    A lease held by a node that is not live counts as free: its owner stopped renewing
    it, and the bucket lets it expire. `node` counts as live itself.
    """
    live = set(live_nodes) | {node}
    shares = fair_shares(shards, live)
    held: dict[str, list[int]] = {name: [] for name in live}
    free: list[int] = []
    for shard in range(shards):
        lease = owners.get(shard)
        if lease is None or lease.node not in live:
            free.append(shard)
        else:
            held[lease.node].append(shard)
    mine = held[node]
    share = shares[node]
    if len(mine) < share:
        # Start from a place of our own in the ring, so that nodes taking free shards
        # at the same moment mostly try different ones.
        offset = sorted(live).index(node) * max(1, shards // len(live))
        ordered = sorted(free, key=lambda shard: (shard - offset) % shards)
        return LeasePlan(tuple(ordered[: share - len(mine)]), ())
    if len(mine) > share:
        # Hand off only what a node below its share can take, the highest shards first.
        wanted = sum(max(0, shares[name] - len(held[name])) for name in live if name != node) - len(free)
        count = min(len(mine) - share, max(0, wanted))
        return LeasePlan((), tuple(sorted(mine, reverse=True)[:count]))
    return LeasePlan((), ())
