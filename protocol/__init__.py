"""soldout's wire protocol: messages, limits and the sans-IO codec.

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
    PutSku,
    Register,
    RegisterReply,
    Reply,
    Reserve,
    SkuReply,
    Stock,
    StockReply,
)

__all__ = [
    "UNCHANGED",
    "AnyReply",
    "Cancel",
    "Command",
    "Confirm",
    "GetHold",
    "GetSku",
    "HoldReply",
    "Limits",
    "PutSku",
    "Register",
    "RegisterReply",
    "Reply",
    "Reserve",
    "SkuReply",
    "Stock",
    "StockReply",
]
