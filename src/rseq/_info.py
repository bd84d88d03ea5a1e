"""Feature discovery: what rseq support the machine and the calling thread have."""
from __future__ import annotations

import dataclasses

from . import _core


@dataclasses.dataclass(frozen=True)
class Info:
    """What rseq support the machine, the process and the calling thread have.

    Every field is also a key of ``python -m rseq info --json``.
    """

    #: The kernel has the rseq system call (also when a seccomp filter denies
    #: it after glibc registered this thread: see ``kernel_probe``).
    kernel: bool
    #: How the kernel probe ``rseq(NULL, 0, 0, 0)`` answered: "ok", "ENOSYS"
    #: (no rseq, or a seccomp filter says so) or "EPERM" (denied).
    kernel_probe: str
    #: ``getauxval(AT_RSEQ_FEATURE_SIZE)``: bytes of struct rseq the kernel
    #: maintains; 0 before Linux 6.3.
    feature_size: int
    #: ``getauxval(AT_RSEQ_ALIGN)``; 0 before Linux 6.3.
    alignment: int
    #: Who registered the calling thread: "glibc", "librseq", "rseq" (this
    #: package) or None (the thread runs on the fallback).
    owner: str | None
    #: Who owns registration in this process (None if nobody can).
    process_owner: str | None
    #: Length of the thread's registration in bytes (0 on the fallback).
    registered_size: int
    #: min(registered length as its owner reports it, kernel feature size).
    usable_size: int
    #: Names of the struct rseq fields that lie inside ``usable_size``.
    fields: tuple[str, ...]
    #: Address of the thread's struct rseq, or None.
    area_address: int | None
    #: The signature abort handlers must carry (0x53053053 on x86).
    signature: int
    #: Number of possible CPU ids (highest possible CPU + 1).
    possible_cpus: int
    #: None, or why the calling thread uses the fallback path.
    fallback: str | None
    #: errno name of the failed registration behind ``fallback``, or None.
    fallback_errno: str | None
    #: The calling thread's ``rseq.register()`` reference count.
    registration_count: int
    #: Time-slice extension advertised in the area's flags (Linux 7.0).
    slice_extension: bool
    #: Time-slice extension enabled for the thread (Linux 7.0).
    slice_extension_enabled: bool
    #: How ``prctl(PR_RSEQ_SLICE_EXTENSION, GET)`` answered: "enabled",
    #: "disabled" or an errno name ("EINVAL" before Linux 7.0).
    slice_extension_prctl: str
    #: Architecture of the critical sections ("x86_64", "aarch64", or "generic":
    #: no critical sections, every per-CPU operation on the atomic fallback).
    arch: str
    #: Per-CPU operations run as real critical sections (else: fallback).
    critical_sections: bool

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def has_field(self, name: str) -> bool:
        """Whether struct rseq field ``name`` is usable by this thread."""
        return name in self.fields


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Info))


def info() -> Info:
    """Feature discovery for the calling thread (registering it lazily)."""
    facts = _core.info_dict()
    return Info(**{name: facts[name] for name in _FIELD_NAMES})
