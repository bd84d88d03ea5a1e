"""The base of every variant: Linux 4.18's rseq(2), the original 32-byte,
32-byte-aligned struct rseq.  Every other design is a subclass that
overrides the hooks it changes (registration rule, the ID fields it writes,
what a system call or a context switch does).
"""

from __future__ import annotations

import copy
from typing import Any

from .. import _abi
from .._machine import EV_PREEMPT, Machine, Thread
from .._program import Syscall

LINUX_SYSCALL_IN_CS = (
    "the thread issued a system call inside a critical section "
    "(Linux kills it when built with CONFIG_DEBUG_RSEQ; otherwise the result is undefined)"
)


def _noop(hook):
    """Marks a hook that does nothing here: the machine skips the call when
    a variant keeps it (Machine.__init__)."""
    hook.noop = True
    return hook


class Variant:
    """Linux 4.18: the original 32-byte, 32-byte-aligned struct rseq."""

    name = "linux-4.18"
    title = "the original 32-byte ABI"
    source = "Linux 4.18 kernel/rseq.c and include/uapi/linux/rseq.h (2018)"
    notes = (
        "Registration length must be exactly 32, aligned to 32.",
        "cpu_id_start and cpu_id are written on every return to user space after an event.",
        "membarrier's rseq fence (Linux 5.10) is not part of this variant: EINVAL.",
    )
    feature_size = 20  # the bytes the 4.18 ABI defines before padding
    align = 32
    default_length = 32
    offsets = {"cpu_id_start": 0, "cpu_id": 4, "rseq_cs": 8, "flags": 16}
    allowed_flags = _abi.FLAG_UNREGISTER
    syscall_in_cs = "fatal"  # or "allowed"
    # a preemption outside a critical section can change what user space sees
    preempt_always_observable = False
    membarrier_rseq = False
    query_offsets = False
    kernel_owned_area = False
    options: dict[str, Any] = {}

    def with_options(self, **options) -> Variant:
        clone = copy.copy(self)
        clone.options = {**self.options, **options}
        return clone

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name} ({opts})"

    def auxv(self) -> dict[int, int]:
        return {}

    # ------------------------------------------------------------ rseq(2)
    def _access_ok(self, addr: int, length: int) -> bool:
        end = addr + length
        return end <= _abi.TASK_SIZE

    def _unregister(
        self, m: Machine, t: Thread, area: int, length: int, flags: int, sig: int
    ) -> int:
        if flags & ~_abi.FLAG_UNREGISTER:
            return -_abi.EINVAL
        reg = t.k["rseq"]
        if reg is None or reg[0] != area:
            return -_abi.EINVAL
        if length != reg[1]:
            return -_abi.EINVAL
        if sig != reg[2]:
            return -_abi.EPERM
        if not self.reset_ids(m, t):
            return -_abi.EFAULT
        t.k["rseq"] = None
        t.k["extra"] = ()
        return 0

    def registration_rule(self, area: int, length: int) -> bool:
        """The alignment and length check of a first registration."""
        return length == _abi.ORIG_SIZE and area % _abi.ORIG_ALIGN == 0

    def sys_rseq(
        self, m: Machine, t: Thread, area: int, length: int, flags: int, sig: int, *more
    ) -> int:
        length &= 0xFFFFFFFF
        sig &= 0xFFFFFFFF
        if flags & _abi.FLAG_UNREGISTER:
            return self._unregister(m, t, area, length, flags, sig)
        if flags & ~(self.allowed_flags & ~_abi.FLAG_UNREGISTER):
            return -_abi.EINVAL
        reg = t.k["rseq"]
        if reg is not None:
            if reg[0] != area or reg[1] != length:
                return -_abi.EINVAL
            if reg[2] != sig:
                return -_abi.EPERM
            return -_abi.EBUSY
        if not self.registration_rule(area, length):
            return -_abi.EINVAL
        if not self._access_ok(area, length):
            return -_abi.EFAULT
        error = self.before_activate(m, t, area, length, flags, more)
        if error:
            return error
        t.k["rseq"] = (area, length, sig)
        t.k["notify"] = True  # rseq_set_notify_resume: IDs before user space runs
        return 0

    def before_activate(self, m, t, area, length, flags, more) -> int:
        t.k["extra"] = ()
        return 0

    # ------------------------------------------------------------ IDs
    def id_fields(self, m: Machine, t: Thread) -> list[tuple[str, int, int]]:
        cpu = t.k["cpu"]
        return [("cpu_id_start", 0, cpu), ("cpu_id", 4, cpu)]

    def update_ids(self, m: Machine, t: Thread) -> None:
        area = t.k["rseq"][0]
        fields = self.id_fields(m, t)
        for field, offset, value in fields:
            if not m.put_user(t, area + offset, value, 4, field):
                m.kill(t, f"cannot write {field} at {m.sym(area + offset)} on return to user space")
        if m.log is not None:
            written = ", ".join(f"{field}={value}" for field, _, value in fields)
            m.say(f"        kernel: {t.name} returns to user space: " + written)

    def reset_ids(self, m: Machine, t: Thread) -> bool:
        area = t.k["rseq"][0]
        return m.put_user(t, area, 0, 4, "cpu_id_start") and m.put_user(
            t, area + 4, _abi.CPU_ID_UNINITIALIZED, 4, "cpu_id"
        )

    # ------------------------------------------------------------ return to user
    def resume(self, m: Machine, t: Thread, from_syscall: bool) -> None:
        if t.k["rseq"] is None:
            return
        # The fixup runs on every return with TIF_NOTIFY_RESUME set, from an
        # interrupt or from a system call during which the thread was switched out.
        self.ip_fixup(m, t, t.k["events"])
        self.update_ids(m, t)

    def read_cs(self, m: Machine, t: Thread):
        """rseq_get_rseq_cs: the descriptor, or kill on the fatal cases."""
        area = t.k["rseq"][0]
        ptr = m.get_user(area + self.offsets["rseq_cs"], 8)
        if ptr is None:
            m.kill(t, "rseq_cs is unreadable")
        if ptr == 0:
            return None
        if ptr >= _abi.TASK_SIZE:
            m.kill(t, f"rseq_cs pointer {ptr:#x} is beyond TASK_SIZE")
        # a descriptor in memory nobody can write (the text's read-only
        # data) is read and checked once per memory layout
        cached = m.constant_cs(ptr, t.k["rseq"][2])
        if cached is not None:
            return cached
        desc = {}
        for field, off in (
            ("version", _abi.CS_OFF_VERSION),
            ("flags", _abi.CS_OFF_FLAGS),
            ("start_ip", _abi.CS_OFF_START_IP),
            ("post_commit_offset", _abi.CS_OFF_POST_COMMIT_OFFSET),
            ("abort_ip", _abi.CS_OFF_ABORT_IP),
        ):
            value = m.get_user(ptr + off, 8 if off >= 8 else 4)
            if value is None:
                m.kill(t, f"struct rseq_cs at {ptr:#x} is unreadable")
            desc[field] = value
        start, length, abort = desc["start_ip"], desc["post_commit_offset"], desc["abort_ip"]
        if start >= _abi.TASK_SIZE or start + length >= _abi.TASK_SIZE or abort >= _abi.TASK_SIZE:
            m.kill(t, "struct rseq_cs points beyond TASK_SIZE")
        if desc["version"] > 0:
            m.kill(t, f"struct rseq_cs version {desc['version']} is unknown")
        if start <= abort < start + length:
            m.kill(t, f"abort_ip {abort:#x} lies inside the critical section")
        sig = m.get_user(abort - 4, 4)
        if sig is None:
            m.kill(t, f"the signature before abort_ip {abort:#x} is unreadable")
        if sig != t.k["rseq"][2]:
            registered = t.k["rseq"][2]
            m.kill(
                t,
                f"signature {sig:#x} before abort_ip differs from the registered {registered:#x}",
            )
        desc["ptr"] = ptr
        words = (ptr + _abi.CS_OFF_VERSION, ptr + _abi.CS_OFF_FLAGS, ptr + _abi.CS_OFF_START_IP,
                 ptr + _abi.CS_OFF_POST_COMMIT_OFFSET, ptr + _abi.CS_OFF_ABORT_IP, abort - 4)
        m.keep_constant_cs(ptr, sig, desc, words)
        return desc

    def clear_rseq_cs(self, m: Machine, t: Thread) -> None:
        area = t.k["rseq"][0]
        if not m.put_user(t, area + self.offsets["rseq_cs"], 0, 8, "rseq_cs"):
            m.kill(t, "cannot clear rseq_cs")

    def ip_fixup(self, m: Machine, t: Thread, events: int) -> None:
        desc = self.read_cs(m, t)
        if desc is None:
            return
        ip = t.ip()
        start, length = desc["start_ip"], desc["post_commit_offset"]
        if not (start <= ip < start + length):
            # outside: the lazy clear of a finished critical section
            self.clear_rseq_cs(m, t)
            return
        if desc["flags"] & _abi.CS_NO_RESTART_FLAGS:
            m.kill(t, "deprecated RSEQ_CS_FLAG_NO_RESTART_* set in rseq_cs.flags")
        area_flags = m.get_user(t.k["rseq"][0] + self.offsets["flags"], 4)
        if area_flags is None:
            m.kill(t, "rseq.flags is unreadable")
        if area_flags & _abi.CS_NO_RESTART_FLAGS:
            m.kill(t, "deprecated RSEQ_CS_FLAG_NO_RESTART_* set in rseq.flags")
        if not events:
            return
        self.clear_rseq_cs(m, t)
        if m.log is not None:
            name = m.sym(desc["ptr"]).removeprefix("cs_")
            m.say(
                f"        kernel: {t.name} was inside {name} at {ip:#x}: "
                f"abort to {desc['abort_ip']:#x}, rseq_cs cleared"
            )
        m.abort_cs(t)

    # ------------------------------------------------------------ hooks
    @_noop
    def on_switch(self, m: Machine, t: Thread, on_cpu: bool) -> None:
        pass

    @_noop
    def on_exit(self, m: Machine, t: Thread) -> None:
        pass

    @_noop
    def after_user_step(self, m: Machine, t: Thread) -> None:
        pass

    @_noop
    def after_yield(self, m: Machine, t: Thread) -> None:
        pass

    @_noop
    def slice_intercepts_preemption(self, m: Machine, t: Thread, incoming) -> bool:
        return False

    def thread_created(self, m: Machine, t: Thread) -> None:
        pass

    def fork(self, m: Machine, parent: Thread, child: Thread) -> None:
        """fork(2): the child keeps the parent thread's registration."""
        child.k["rseq"] = parent.k["rseq"]
        child.k["extra"] = parent.k["extra"]

    def exec(self, m: Machine, t: Thread) -> None:
        """execve(2): the new image starts unregistered."""
        t.k["rseq"] = None
        t.k["extra"] = ()

    # ------------------------------------------------------------ syscalls
    def syscall_entry(self, m: Machine, t: Thread, step: Syscall) -> None:
        if self.syscall_in_cs != "fatal" or t.k["rseq"] is None:
            return
        desc = self.read_cs(m, t)
        if desc is None:
            return
        if desc["start_ip"] <= t.ip() < desc["start_ip"] + desc["post_commit_offset"]:
            m.kill(t, LINUX_SYSCALL_IN_CS)

    def syscall(self, m: Machine, t: Thread, step: Syscall) -> tuple[int, bool]:
        name, args = step.name, step.args
        if name == "rseq":
            return self.sys_rseq(m, t, *args), False
        if name == "getcpu":
            return t.k["cpu"], False
        if name == "sched_yield":
            return 0, True
        if name in ("getpid", "write", "nop"):
            return 0, False
        if name == "membarrier":
            return self.sys_membarrier(m, t, *args), False
        return -_abi.ENOSYS, False

    def sys_membarrier(self, m: Machine, t: Thread, cmd: int, flags: int = 0, cpu: int = 0) -> int:
        if not self.membarrier_rseq:
            return -_abi.EINVAL
        if cmd == _abi.MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ:
            m.membarrier_registered = True
            return 0
        if cmd != _abi.MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ:
            return -_abi.EINVAL
        if flags & ~_abi.MEMBARRIER_CMD_FLAG_CPU:
            return -_abi.EINVAL
        if not m.membarrier_registered:
            return -_abi.EPERM
        # An IPI to every CPU running another thread of the process: the
        # interrupted thread takes the rseq preempt path before it returns.
        for other in m.threads:
            if other is t or other.k["cpu"] is None:
                continue
            if flags & _abi.MEMBARRIER_CMD_FLAG_CPU and other.k["cpu"] != cpu:
                continue
            if other.k["rseq"] is None:
                continue
            m.say(f"        kernel: membarrier IPI to cpu{other.k['cpu']} ({other.name})")
            other.k["events"] |= EV_PREEMPT
            other.k["notify"] = True
            m.return_to_user(other)
        return 0

    def describe(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "source": self.source,
            "feature_size": self.feature_size,
            "align": self.align,
            "notes": list(self.notes),
        }
