"""The scenarios shipped with the explorer: small user-space algorithms and
registration protocols, each with the property it must keep, in pairs of a
broken and a correct design where one exists.

Programs keep all their state in locals (while loops, no hidden iterators),
so the explorer can hash it.

One module per family; each ends with a ``SCENARIOS`` tuple.  To add a
family, write its module (see docs/model.md, "Adding a scenario family") and
add the module to ``FAMILIES`` below: that is the only registration.  The
order of ``FAMILIES`` is the order ``python -m rseq model list`` prints.
"""

from __future__ import annotations

from . import (
    counter,
    interposed,
    libraries,
    list_pop,
    mutex,
    pool,
    ring,
    syscall_in_cs,
    time_slice,
)
from ._base import ALL, LINUX, SIG, Scenario, ThreadSpec

FAMILIES = (counter, list_pop, libraries, interposed, mutex, time_slice, syscall_in_cs, ring,
            pool)

SCENARIOS: dict[str, Scenario] = {}
for _family in FAMILIES:
    for _scenario in _family.SCENARIOS:
        if _scenario.name in SCENARIOS:
            raise RuntimeError(f"scenario {_scenario.name!r} is defined twice")
        SCENARIOS[_scenario.name] = _scenario
del _family, _scenario

__all__ = ["ALL", "FAMILIES", "LINUX", "SCENARIOS", "SIG", "Scenario", "ThreadSpec"]
