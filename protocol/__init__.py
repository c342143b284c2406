"""soldout's wire protocol: messages, limits and the sans-IO codec.

Nothing imported here does I/O or imports trio; the client (`protocol.client`) is the
one module of this package that does, and it is imported on its own.
"""

from protocol.limits import Limits
from protocol.messages import (
    AnyReply,
    Cancel,
    Command,
    Confirm,
    PutSku,
    Register,
    Reply,
    Reserve,
    Stock,
    StockReply,
)

__all__ = [
    "AnyReply",
    "Cancel",
    "Command",
    "Confirm",
    "Limits",
    "PutSku",
    "Register",
    "Reply",
    "Reserve",
    "Stock",
    "StockReply",
]
