"""Registration helpers over the C core."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from . import _core


@contextlib.contextmanager
def registered() -> Iterator[int]:
    """Hold a reference on the calling thread's registration for a block.

    ``with rseq.registered() as count:`` registers the thread if nobody has
    (raising ``rseq.RegistrationError`` if that is impossible) and drops the
    reference on exit; the registration ends only when the last reference
    of every user in the process is gone.  A registration that a read made
    lazily holds a reference of its own, so ``with rseq.registered(): pass``
    never ends it.
    """
    count = _core.register()
    try:
        yield count
    finally:
        _core.unregister()


def get_include() -> str:
    """The directory to add to a C extension's include path for
    ``#include <rseq/capi.h>`` (the C API) and ``<rseq/abi.h>``."""
    return os.path.join(os.path.dirname(__file__), "include")
