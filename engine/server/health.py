"""What a load balancer or an orchestrator asks of a server process: is it up, is it ready.

`/healthz` answers 200 while the process runs. `/readyz` answers 200 only while the
journals are recovered, the gateway accepts connections and every shard can commit;
503 while starting, while shutting down, and while any shard is `unavailable`.
"""

from __future__ import annotations

from typing import Final

import trio

from engine.api import Engine

STARTING: Final = "starting"
SERVING: Final = "serving"
STOPPING: Final = "stopping"
TEXT: Final = b"text/plain; charset=utf-8"


class ServerHealth:
    def __init__(self) -> None:
        self.state = STARTING
        self.engine: Engine | None = None
        # Where /healthz and /readyz answer, from before recovery begins.
        self.metrics_port: int | None = None
        self.listening = trio.Event()

    def serving(self, engine: Engine) -> None:
        self.engine = engine
        self.state = SERVING

    def stopping(self) -> None:
        self.state = STOPPING

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for /readyz."""
        if self.state != SERVING or self.engine is None:
            return False, self.state
        unavailable = [str(shard.shard) for shard in self.engine.statistics().shards if shard.state != SERVING]
        if unavailable:
            return False, f"shards unavailable: {', '.join(unavailable)}"
        return True, "ready"

    async def healthz(self) -> tuple[int, bytes, bytes]:
        return 200, TEXT, b"ok\n"

    async def readyz(self) -> tuple[int, bytes, bytes]:
        ready, why = self.readiness()
        return (200 if ready else 503), TEXT, why.encode() + b"\n"
