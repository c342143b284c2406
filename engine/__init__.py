"""soldout's engine: sharded stock-counter actors with a durable journal.

from engine import open_engine, EngineConfig

async with open_engine(EngineConfig(shards=8, data_dir=None)) as engine:
    await engine.put_sku("MI-BAND-1", stock=10_000, per_buyer_limit=1)
    reply = await engine.reserve("MI-BAND-1", buyer="u42", qty=1, key="u42-1")
"""

from engine.api import Engine, EngineClosed, EngineStatistics, SkuCounts, open_engine
from engine.book import Book, InvariantViolation
from engine.config import EngineConfig
from engine.journal import JournalCorrupt
from engine.manifest import MissingFile
from engine.store import DataDirError
from protocol.limits import Limits
from protocol.messages import (
    UNCHANGED,
    Cancel,
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
    "Book",
    "Cancel",
    "Confirm",
    "DataDirError",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineStatistics",
    "GetHold",
    "GetSku",
    "HoldReply",
    "InvariantViolation",
    "JournalCorrupt",
    "Limits",
    "MissingFile",
    "PutSku",
    "Register",
    "RegisterReply",
    "Reply",
    "Reserve",
    "SkuCounts",
    "SkuReply",
    "Stock",
    "StockReply",
    "open_engine",
]
