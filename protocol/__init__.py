"""soldout's wire protocol: messages, limits, the command parser and the sans-IO codec.

Nothing imported here does I/O or imports trio; the client (`protocol.client`) is the
one module of this package that does, and it is imported on its own.
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
