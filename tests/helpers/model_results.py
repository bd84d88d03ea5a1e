"""The Python explorer's result for a scenario at its default bounds, computed
once per test session: test_model_scenarios checks it against the scenario's
documented outcome, test_model_spin against SPIN's verdict (list-pop-rseq's
search alone takes about 12 s)."""
from __future__ import annotations

import functools


@functools.cache
def explored(name: str, variant: str):
    from rseq.model import explore

    return explore(name, variant)
