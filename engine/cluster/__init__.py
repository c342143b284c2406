"""soldout's cluster mode: shards owned by lease across processes over NATS JetStream.

`engine.cluster.nats` is the one module that talks to NATS (nats-py, an asyncio
library, driven from trio through trio-asyncio); nothing else in soldout imports
nats, asyncio or trio_asyncio. Its interface is plain trio and its errors are its own.
`leases` plans who owns which shard, and `journal_format` is a shard's journal as
stream messages; both are pure.
"""


class ClusterUnavailable(Exception):
    """NATS cannot be reached, or refused what a node needs of it (one line, for the command line)."""
