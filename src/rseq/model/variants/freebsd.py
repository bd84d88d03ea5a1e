"""seed 004: the rseq(2) proposed for FreeBSD in 2021."""

from __future__ import annotations

from ._base import Variant


class FreeBSD2021(Variant):
    name = "freebsd-2021"
    title = "seed 004: the proposed FreeBSD rseq(2)"
    source = "seed 004: FreeBSD review D32505 'Add rseq(2)' by kib, October 2021 (not landed)"
    notes = (
        "Source compatible with Linux 4.18: the same 32-byte struct rseq, struct rseq_cs, "
        "signature check and abort on preemption or signal.",
        "A system call inside a critical section is allowed and raises no signal; if the thread "
        "was switched out during the call, the section aborts when it returns to user space.",
        "No membarrier rseq fence (FreeBSD 14.1 membarrier has no rseq commands): EINVAL.",
        "Error numbers of rseq(2) are not given by the review; the model uses Linux 4.18's.",
    )
    syscall_in_cs = "allowed"


VARIANTS = (FreeBSD2021(),)
