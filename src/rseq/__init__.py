"""rseq: Linux restartable sequences for Python.

The rseq runtime (per-thread registration that coexists with glibc and other
registrants, feature discovery, the current CPU / NUMA node / concurrency ID
in one memory load), per-CPU data structures built on real critical
sections, and an executable model of the rseq ABI (``rseq.model``).
"""
from ._arena import Arena
from ._core import (
    ArenaCounter,
    ArenaError,
    ArenaFormatError,
    ArenaFullError,
    NotOwnedWarning,
    PerCpuCounter,
    PoolBlock,
    RegistrationError,
    RingRecord,
    RseqError,
    Unsupported,
    cpu,
    mm_cid,
    node,
    register,
    registration_count,
    unregister,
)
from ._info import Info, info
from ._pool import Pool, PoolError, PoolExhaustedError, PoolOwnershipError, PoolStats
from ._registration import get_include, registered
from ._ring import Ring, RingBusyError, RingStats

__version__ = "0.1.0"

__all__ = [
    "Arena",
    "ArenaCounter",
    "ArenaError",
    "ArenaFormatError",
    "ArenaFullError",
    "Info",
    "NotOwnedWarning",
    "PerCpuCounter",
    "Pool",
    "PoolBlock",
    "PoolError",
    "PoolExhaustedError",
    "PoolOwnershipError",
    "PoolStats",
    "RegistrationError",
    "Ring",
    "RingBusyError",
    "RingRecord",
    "RingStats",
    "RseqError",
    "Unsupported",
    "cpu",
    "get_include",
    "info",
    "mm_cid",
    "node",
    "register",
    "registered",
    "registration_count",
    "unregister",
]
