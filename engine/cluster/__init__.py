"""soldout as a cluster: shards owned by lease across nodes, on NATS JetStream."""
