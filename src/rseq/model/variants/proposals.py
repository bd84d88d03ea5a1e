"""The seed proposals that never landed in Linux: seed 000's size flag
(2020), seed 001's scheduler state (2023) and seed 003's kernel TLS area
(2020).  Each follows its mailing-list thread; the choices the thread left
open are in the variant's ``notes``."""

from __future__ import annotations

from .. import _abi
from .._machine import Machine, Thread
from .._program import Syscall
from ._base import Variant
from .linux import Linux63


class SizeFlag2020(Variant):
    name = "size-flag-2020"
    title = "seed 000: size negotiation by a flag bit, user_size and kernel_size = min(...)"
    source = "seed 000: Desnoyers to Brauner, linux-kernel, July 2020 ('rseq extensibility')"
    notes = (
        "struct rseq gains u32 user_size at 20 and u32 kernel_size at 24 when rseq.flags has "
        "RSEQ_CS_FLAG_SIZE (1 << 3), set by whoever defines the __rseq_abi symbol.",
        "On registration the kernel reads the flag and user_size from the area itself and writes "
        "kernel_size = min(its sizeof(struct rseq) = 40, user_size); without the flag only the "
        "original 32 bytes are used.",
        "New fields after the original 32 bytes: node_id at 32, mm_cid at 36 (the model's layout).",
        "Option negotiate=False models a kernel that trusts the registrant's rseq_len instead: "
        "kernel_size = min(40, rseq_len).",
        "Registration: length >= 32, 32-byte aligned; errors otherwise as Linux 4.18.",
    )
    feature_size = _abi.SF_KERNEL_SIZE
    align = 32
    default_length = _abi.SF_KERNEL_SIZE
    offsets = {
        "cpu_id_start": 0,
        "cpu_id": 4,
        "rseq_cs": 8,
        "flags": 16,
        "user_size": 20,
        "kernel_size": 24,
        "node_id": 32,
        "mm_cid": 36,
    }
    options = {"negotiate": True}

    def registration_rule(self, area: int, length: int) -> bool:
        return length >= _abi.ORIG_SIZE and area % _abi.ORIG_ALIGN == 0

    def before_activate(self, m, t, area, length, flags, more) -> int:
        if self.options.get("negotiate", True):
            area_flags = m.get_user(area + _abi.OFF_FLAGS, 4)
            if area_flags is None:
                return -_abi.EFAULT
            if area_flags & _abi.SIZE_FLAG:
                user_size = m.get_user(area + _abi.SF_OFF_USER_SIZE, 4)
                if user_size is None:
                    return -_abi.EFAULT
                kernel_size = min(_abi.SF_KERNEL_SIZE, user_size)
                if not m.put_user(t, area + _abi.SF_OFF_KERNEL_SIZE, kernel_size, 4, "kernel_size"):
                    return -_abi.EFAULT
            else:
                kernel_size = _abi.ORIG_SIZE
        else:
            kernel_size = min(_abi.SF_KERNEL_SIZE, length)
        t.k["extra"] = (kernel_size,)
        return 0

    def id_fields(self, m: Machine, t: Thread):
        (kernel_size,) = t.k["extra"]
        cpu = t.k["cpu"]
        fields = [("cpu_id_start", 0, cpu), ("cpu_id", 4, cpu)]
        if kernel_size >= _abi.SF_OFF_NODE_ID + 4:
            fields.append(("node_id", _abi.SF_OFF_NODE_ID, m.nodes[cpu]))
        if kernel_size >= _abi.SF_OFF_MM_CID + 4:
            fields.append(("mm_cid", _abi.SF_OFF_MM_CID, t.k["mm_cid"]))
        return fields


class SchedState2023(Linux63):
    name = "sched-state-2023"
    title = "seed 001: sched_state (owner on CPU) in a shared area with its own feature size"
    source = (
        "seed 001: Desnoyers, 'rseq: Add sched_state field to struct rseq' RFC v2 thread, "
        "May 2023"
    )
    notes = (
        "rseq(area, len, RSEQ_FLAG_SHARED, sig, shared) registers a thread-local area as Linux 6.3 "
        "and a second area other threads read; RSEQ_FLAG_SHARED = 1 << 2 is the model's value.",
        "auxv: AT_RSEQ_FEATURE_SIZE 28 for the local part, AT_RSEQ_SHARED_FEATURE_SIZE 4 for the "
        "shared part; both areas aligned to AT_RSEQ_ALIGN (32).",
        "The shared area holds u32 sched_state, bit 0 = on a CPU, written by the kernel on every "
        "switch in and out (and cleared on exit).",
    )
    allowed_flags = _abi.FLAG_UNREGISTER | _abi.FLAG_SHARED
    shared_feature_size = 4

    def auxv(self) -> dict[int, int]:
        return {**super().auxv(), "AT_RSEQ_SHARED_FEATURE_SIZE": self.shared_feature_size}

    def before_activate(self, m, t, area, length, flags, more) -> int:
        error = super().before_activate(m, t, area, length, flags, more)
        if error:
            return error
        shared = 0
        if flags & _abi.FLAG_SHARED:
            if not more:
                return -_abi.EINVAL
            shared = more[0]
            if shared % self.align or not self._access_ok(shared, self.shared_feature_size):
                return -_abi.EINVAL
            if not m.put_user(t, shared, _abi.SCHED_STATE_ON_CPU, 4, "sched_state"):
                return -_abi.EFAULT
        t.k["extra"] = (shared,)
        return 0

    def on_switch(self, m: Machine, t: Thread, on_cpu: bool) -> None:
        if t.k["rseq"] is None or not t.k["extra"] or not t.k["extra"][0]:
            return
        state = _abi.SCHED_STATE_ON_CPU if on_cpu else 0
        m.put_user(t, t.k["extra"][0], state, 4, "sched_state")

    def on_exit(self, m: Machine, t: Thread) -> None:
        self.on_switch(m, t, False)


class Ktls2020(Linux63):
    name = "ktls-2020"
    title = "seed 003: a kernel TLS area whose layout is found through an offset query"
    source = (
        "seed 003: Desnoyers and Weimer, 'rseq: Implement KTLS prototype for x86-64', "
        "Sept-Oct 2020"
    )
    notes = (
        "The kernel places each thread's area itself (at thread creation); user space finds a "
        "field through an accessor (the model's rseq_offset(name) call, standing for the vDSO "
        "function), never through a fixed offset.",
        "The kernel's private layout: rseq_cs 0, cpu_id_start 8, cpu_id 12, flags 16, "
        "node_id 20, mm_cid 24.",
        "rseq(2) only sets the signature: the area argument must be the thread's KTLS area or "
        "NULL; EBUSY when already set, errors otherwise as Linux 6.3.",
    )
    offsets = {
        "rseq_cs": 0,
        "cpu_id_start": 8,
        "cpu_id": 12,
        "flags": 16,
        "node_id": 20,
        "mm_cid": 24,
    }
    query_offsets = True
    kernel_owned_area = True

    def sys_rseq(self, m, t, area, length, flags, sig, *more) -> int:
        ktls = t.k["extra"][0] if t.k["extra"] else 0
        if area not in (0, ktls):
            return -_abi.EINVAL
        if flags & _abi.FLAG_UNREGISTER:
            if flags & ~_abi.FLAG_UNREGISTER or t.k["rseq"] is None:
                return -_abi.EINVAL
            if t.k["rseq"][2] != sig & 0xFFFFFFFF:
                return -_abi.EPERM
            t.k["rseq"] = None
            return 0
        if flags:
            return -_abi.EINVAL
        if t.k["rseq"] is not None:
            return -_abi.EPERM if t.k["rseq"][2] != sig & 0xFFFFFFFF else -_abi.EBUSY
        t.k["rseq"] = (ktls, 32, sig & 0xFFFFFFFF)
        t.k["notify"] = True
        return 0

    def thread_created(self, m: Machine, t: Thread) -> None:
        t.k["extra"] = (t.ctx.area,) if t.ctx is not None else ()

    def exec(self, m: Machine, t: Thread) -> None:
        t.k["rseq"] = None

    def id_fields(self, m: Machine, t: Thread):
        cpu = t.k["cpu"]
        o = self.offsets
        return [
            ("cpu_id_start", o["cpu_id_start"], cpu),
            ("cpu_id", o["cpu_id"], cpu),
            ("node_id", o["node_id"], m.nodes[cpu]),
            ("mm_cid", o["mm_cid"], t.k["mm_cid"]),
        ]

    def reset_ids(self, m, t) -> bool:
        return True

    def syscall(self, m: Machine, t: Thread, step: Syscall):
        if step.name == "rseq_offset":
            offset = self.offsets.get(step.args[0])
            return (offset if offset is not None else -_abi.EINVAL), False
        return super().syscall(m, t, step)


VARIANTS = (SizeFlag2020(), SchedState2023(), Ktls2020())
