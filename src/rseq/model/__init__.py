"""rseq.model: an executable model of the rseq ABI and its proposed extensions.

A model kernel (CPUs, threads, a scheduler, signals, the rseq system call)
runs user-space programs written as generator functions, one memory or
system-call step at a time, under one of several ABI variants; an explorer
runs them through every interleaving within a bound.  See docs/model.md.
"""

from ._abi import errno_name
from ._explore import Result, explore, random_walk, replay
from ._machine import Machine, Region, Thread
from ._program import (
    Abort,
    Cas,
    Choose,
    Context,
    CriticalSection,
    Load,
    Mark,
    Store,
    Syscall,
    current_cpu,
    load_add_store,
    load_cbeq_store_add_load_store,
    load_cbne_store,
    rseq_field,
    rseq_register,
    rseq_unregister,
)
from .conformance import CASES, conformance
from .scenarios import SCENARIOS, Scenario, ThreadSpec
from .variants import VARIANTS, Variant

__all__ = [
    "Abort",
    "CASES",
    "Cas",
    "Choose",
    "Context",
    "CriticalSection",
    "Load",
    "Machine",
    "Mark",
    "Region",
    "Result",
    "SCENARIOS",
    "Scenario",
    "Store",
    "Syscall",
    "Thread",
    "ThreadSpec",
    "VARIANTS",
    "Variant",
    "conformance",
    "current_cpu",
    "errno_name",
    "explore",
    "load_add_store",
    "load_cbeq_store_add_load_store",
    "load_cbne_store",
    "random_walk",
    "replay",
    "rseq_field",
    "rseq_register",
    "rseq_unregister",
]
