"""ABI variants: the kernel half of each rseq design the project models.

Each variant names the source it models.  Check orders follow the kernel
where a kernel exists (kernel/rseq.c, sys_rseq and rseq_ip_fixup); for the
designs that never landed they follow the mailing-list thread, and every
choice the thread left open is written down in the variant's ``notes``.

One module per family; each ends with a ``VARIANTS`` tuple of instances.
To add a family, write its module (subclass :class:`Variant`, or a Linux
kernel from ``linux``) and add the module to ``FAMILIES`` below: that is
the only registration.  The order of ``FAMILIES`` is the order the CLI
lists variants in.
"""

from __future__ import annotations

from . import freebsd, linux, proposals
from ._base import LINUX_SYSCALL_IN_CS, Variant

FAMILIES = (linux, proposals, freebsd)

VARIANTS: dict[str, Variant] = {}
for _family in FAMILIES:
    for _variant in _family.VARIANTS:
        if _variant.name in VARIANTS:
            raise RuntimeError(f"variant {_variant.name!r} is defined twice")
        VARIANTS[_variant.name] = _variant
del _family, _variant

__all__ = ["FAMILIES", "LINUX_SYSCALL_IN_CS", "VARIANTS", "Variant"]
