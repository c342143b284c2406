"""soldout's wire protocol: messages, limits, the command parser and the sans-IO codec.

Nothing imported here does I/O or imports trio; the clients are the only modules of this
package that do, each imported on its own: `protocol.client` (trio) and `protocol.aio`
(asyncio), both thin transports around the sans-IO `protocol.client_core`.
"""

from protocol.limits import Limits
from protocol.messages import (
    UNCHANGED,
    AnyReply,
    Cancel,
    Command,
    Confirm,
    GetHold,
    GetSku,
    HoldReply,
    HoldState,
    PutSku,
    Register,
    RegisterReply,
    Reply,
    Reserve,
    SkuReply,
    StatsReply,
    Status,
    Stock,
    StockReply,
)
from protocol.parser import CommandParser

__all__ = [
    "UNCHANGED",
    "AnyReply",
    "Cancel",
    "Command",
    "CommandParser",
    "Confirm",
    "GetHold",
    "GetSku",
    "HoldReply",
    "HoldState",
    "Limits",
    "PutSku",
    "Register",
    "RegisterReply",
    "Reply",
    "Reserve",
    "SkuReply",
    "StatsReply",
    "Status",
    "Stock",
    "StockReply",
]
