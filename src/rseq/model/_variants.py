"""ABI variants: the kernel half of each rseq design the project models.

Each variant names the source it models.  Check orders follow the kernel
where a kernel exists (kernel/rseq.c, sys_rseq and rseq_ip_fixup); for the
designs that never landed they follow the mailing-list thread, and every
choice the thread left open is written down in the variant's ``notes``.
"""

from __future__ import annotations

import copy
from typing import Any

from . import _abi
from ._machine import EV_PREEMPT, Machine, Thread
from ._program import Syscall

LINUX_SYSCALL_IN_CS = (
    "the thread issued a system call inside a critical section "
    "(Linux kills it when built with CONFIG_DEBUG_RSEQ; otherwise the result is undefined)"
)


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

    def _unregister(self, m: Machine, t: Thread, area: int, length: int, flags: int, sig: int) -> int:
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

    def sys_rseq(self, m: Machine, t: Thread, area: int, length: int, flags: int, sig: int, *more) -> int:
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
        written = []
        for field, offset, value in self.id_fields(m, t):
            if not m.put_user(t, area + offset, value, 4, field):
                m.kill(t, f"cannot write {field} at {m.sym(area + offset)} on return to user space")
            written.append(f"{field}={value}")
        m.say(f"        kernel: {t.name} returns to user space: " + ", ".join(written))

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
            m.kill(t, f"signature {sig:#x} before abort_ip differs from the registered {t.k['rseq'][2]:#x}")
        desc["ptr"] = ptr
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
        name = m.sym(desc["ptr"]).removeprefix("cs_")
        m.say(
            f"        kernel: {t.name} was inside {name} at {ip:#x}: abort to {desc['abort_ip']:#x}, rseq_cs cleared"
        )
        m.abort_cs(t)

    # ------------------------------------------------------------ hooks
    def on_switch(self, m: Machine, t: Thread, on_cpu: bool) -> None:
        pass

    def on_exit(self, m: Machine, t: Thread) -> None:
        pass

    def after_user_step(self, m: Machine, t: Thread) -> None:
        pass

    def after_yield(self, m: Machine, t: Thread) -> None:
        pass

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
        if desc is not None and desc["start_ip"] <= t.ip() < desc["start_ip"] + desc["post_commit_offset"]:
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


class Linux63(Variant):
    name = "linux-6.3"
    title = "the extensible ABI: AT_RSEQ_FEATURE_SIZE / AT_RSEQ_ALIGN, node_id, mm_cid"
    source = (
        "Linux 6.3 'rseq: Introduce extensible rseq ABI' (2022-11) as kept through 6.18, "
        "with the 6.x rule that a registration clears a stale rseq_cs"
    )
    notes = (
        "Length 32 needs 32-byte alignment; any other length must be >= 32, "
        "cover the feature size and be aligned to AT_RSEQ_ALIGN.",
        "Unregistration must repeat the registered length.",
        "Registration reads rseq_cs (EFAULT when the area is unreadable) and clears a non-zero one.",
        "node_id and mm_cid are written with the CPU ids on every return after an event.",
        "membarrier PRIVATE_EXPEDITED_RSEQ restarts the other threads' critical sections.",
    )
    feature_size = 28
    align = 32
    offsets = {"cpu_id_start": 0, "cpu_id": 4, "rseq_cs": 8, "flags": 16, "node_id": 20, "mm_cid": 24}
    membarrier_rseq = True

    def auxv(self) -> dict[int, int]:
        return {_abi.AT_RSEQ_FEATURE_SIZE: self.feature_size, _abi.AT_RSEQ_ALIGN: self.align}

    def registration_rule(self, area: int, length: int) -> bool:
        if length < _abi.ORIG_SIZE:
            return False
        if length == _abi.ORIG_SIZE:
            return area % _abi.ORIG_ALIGN == 0
        return area % self.align == 0 and length >= self.feature_size

    def before_activate(self, m, t, area, length, flags, more) -> int:
        cs = m.get_user(area + _abi.OFF_RSEQ_CS, 8)
        if cs is None:
            return -_abi.EFAULT
        if cs and not m.put_user(t, area + _abi.OFF_RSEQ_CS, 0, 8, "rseq_cs"):
            return -_abi.EFAULT
        t.k["extra"] = ()
        return 0

    def id_fields(self, m: Machine, t: Thread):
        cpu = t.k["cpu"]
        return [
            ("cpu_id_start", 0, cpu),
            ("cpu_id", 4, cpu),
            ("node_id", 20, m.nodes[cpu]),
            ("mm_cid", 24, t.k["mm_cid"]),
        ]

    def reset_ids(self, m: Machine, t: Thread) -> bool:
        area = t.k["rseq"][0]
        return (
            super().reset_ids(m, t)
            and m.put_user(t, area + 20, 0, 4, "node_id")
            and m.put_user(t, area + 24, 0, 4, "mm_cid")
        )


class Linux70(Linux63):
    name = "linux-7.0"
    title = "time-slice extension; legacy (32-byte) and optimised (longer) registrations"
    source = (
        "Linux 7.0 rseq rework and time-slice extension (2025-2026): uapi rseq.h slice_ctrl, "
        "PR_RSEQ_SLICE_EXTENSION, rseq_slice_yield(); this project's fact sheet"
    )
    notes = (
        "AT_RSEQ_FEATURE_SIZE 33, AT_RSEQ_ALIGN 64.",
        "A 32-byte registration runs in legacy mode: every ID field is rewritten after each event.",
        "A longer registration runs in optimised mode: IDs are written only when they change, and "
        "a process that wrote a read-only ID field is killed on its next return to user space.",
        "Slice extension: prctl(PR_RSEQ_SLICE_EXTENSION, SET, ENABLE) or RSEQ_FLAG_SLICE_EXT_DEFAULT_ON; "
        "a preemption of a thread whose slice_ctrl.request is set is deferred: granted=1 for a bounded "
        "number of steps; rseq_slice_yield() ends the grant; any other system call revokes it.",
        "The model grants in both modes; the grant bound is counted in user steps "
        "(option slice_steps, default 5) instead of microseconds; option revoke_on_syscall=False "
        "is a design that keeps the grant across system calls.",
    )
    feature_size = 33
    align = 64
    offsets = {
        "cpu_id_start": 0,
        "cpu_id": 4,
        "rseq_cs": 8,
        "flags": 16,
        "node_id": 20,
        "mm_cid": 24,
        "slice_request": 28,
        "slice_granted": 29,
    }
    allowed_flags = _abi.FLAG_UNREGISTER | _abi.FLAG_SLICE_EXT_DEFAULT_ON
    preempt_always_observable = True  # slice grants and optimised-mode checks

    @property
    def slice_steps(self) -> int:
        return self.options.get("slice_steps", 5)

    def before_activate(self, m, t, area, length, flags, more) -> int:
        error = super().before_activate(m, t, area, length, flags, more)
        if error:
            return error
        mode = "legacy" if length == _abi.ORIG_SIZE else "optimised"
        enabled = bool(flags & _abi.FLAG_SLICE_EXT_DEFAULT_ON)
        advert = _abi.FLAGS_SLICE_EXT_AVAILABLE | (_abi.FLAGS_SLICE_EXT_ENABLED if enabled else 0)
        if not m.put_user(t, area + _abi.OFF_FLAGS, advert, 4, "flags"):
            return -_abi.EFAULT
        t.k["extra"] = (mode, ())  # (mode, last written ids)
        t.k["slice"] = (enabled, 0, None)
        return 0

    def update_ids(self, m: Machine, t: Thread) -> None:
        mode, cached = t.k["extra"]
        if mode == "legacy":
            return super().update_ids(m, t)
        area = t.k["rseq"][0]
        fields = self.id_fields(m, t)
        # optimised mode: the kernel keeps a copy and kills on tampering
        for (field, offset, _), old in zip(fields, cached or (None,) * len(fields)):
            if old is None:
                continue
            if m.get_user(area + offset, 4) != old:
                m.kill(t, f"user space wrote the read-only field {field} (optimised mode)")
        written = []
        new_cache = []
        for (field, offset, value), old in zip(fields, cached or (None,) * len(fields)):
            if value != old:
                if not m.put_user(t, area + offset, value, 4, field):
                    m.kill(t, f"cannot write {field} on return to user space")
                written.append(f"{field}={value}")
            new_cache.append(value)
        t.k["extra"] = (mode, tuple(new_cache))
        m.say(
            f"        kernel: {t.name} returns to user space (optimised): "
            + (", ".join(written) if written else "no ID changed")
        )

    # -- time-slice extension
    def _slice_bytes(self, m, t):
        area = t.k["rseq"][0]
        return m.get_user(area + 28, 1), m.get_user(area + 29, 1)

    def slice_intercepts_preemption(self, m: Machine, t: Thread, incoming) -> bool:
        if t.k["rseq"] is None:
            return False
        enabled, left, pending = t.k["slice"]
        if not enabled:
            return False
        if left > 0:
            m.say(f"        sched: preempt {t.name}: already deferred by its grant")
            return True
        request, _ = self._slice_bytes(m, t)
        if not request:
            return False
        area = t.k["rseq"][0]
        if not (m.put_user(t, area + 28, 0, 1, "slice_request") and m.put_user(t, area + 29, 1, 1, "slice_granted")):
            m.kill(t, "cannot write slice_ctrl")
        t.k["slice"] = (True, self.slice_steps, incoming)
        m.say(f"        sched: preempt {t.name} deferred: slice extension granted for {self.slice_steps} steps")
        return True

    def _revoke(self, m: Machine, t: Thread, why: str) -> None:
        enabled, left, pending = t.k["slice"]
        area = t.k["rseq"][0]
        if not m.put_user(t, area + 29, 0, 1, "slice_granted"):
            m.kill(t, "cannot write slice_ctrl")
        t.k["slice"] = (enabled, 0, None)
        t.k["handoff"] = pending if pending is not None else t.tid
        m.say(f"        kernel: grant of {t.name} ends ({why}); the deferred preemption happens")

    def after_user_step(self, m: Machine, t: Thread) -> None:
        enabled, left, pending = t.k["slice"]
        if left <= 0 or t.k["cpu"] is None:
            return
        left -= 1
        t.k["slice"] = (enabled, left, pending)
        if left == 0:
            self._revoke(m, t, "the grant timer expired")
            cpu = t.k["cpu"]
            m.switch_out(t, EV_PREEMPT)
            self.after_yield(m, t, cpu)

    def after_yield(self, m: Machine, t: Thread, cpu: int | None = None) -> None:
        handoff = t.k.pop("handoff", None)
        if handoff is None:
            return
        cpu = t.k["last_cpu"] if cpu is None else cpu
        incoming = m.thread(handoff)
        if incoming.alive and incoming.k["cpu"] is None and m.cpus[cpu] is None and incoming.stack:
            m.schedule_in(incoming, cpu)

    def syscall(self, m: Machine, t: Thread, step: Syscall):
        enabled, left, pending = t.k["slice"]
        if step.name == "rseq_slice_yield":
            if left > 0:
                self._revoke(m, t, "rseq_slice_yield()")
                return 0, True
            return 0, False
        if left > 0 and self.options.get("revoke_on_syscall", True):
            self._revoke(m, t, f"system call {step.name}() revokes the grant")
            result, _ = super().syscall(m, t, step)
            return result, True
        if step.name == "prctl":
            return self.sys_prctl(m, t, *step.args), False
        return super().syscall(m, t, step)

    def sys_prctl(self, m: Machine, t: Thread, option: int, cmd: int = 0, arg: int = 0, *rest) -> int:
        if option != _abi.PR_RSEQ_SLICE_EXTENSION:
            return -_abi.EINVAL
        if cmd == _abi.PR_RSEQ_SLICE_EXTENSION_GET:
            return int(t.k["slice"][0])
        if cmd != _abi.PR_RSEQ_SLICE_EXTENSION_SET or arg & ~_abi.PR_RSEQ_SLICE_EXT_ENABLE:
            return -_abi.EINVAL
        if t.k["rseq"] is None:
            return -_abi.ENXIO
        if self.options.get("slice_disabled_at_boot"):
            return -_abi.ENOTSUPP
        enabled = bool(arg & _abi.PR_RSEQ_SLICE_EXT_ENABLE)
        area = t.k["rseq"][0]
        advert = _abi.FLAGS_SLICE_EXT_AVAILABLE | (_abi.FLAGS_SLICE_EXT_ENABLED if enabled else 0)
        if not m.put_user(t, area + _abi.OFF_FLAGS, advert, 4, "flags"):
            return -_abi.EFAULT
        t.k["slice"] = (enabled, 0, None)
        return 0


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
    source = "seed 001: Desnoyers, 'rseq: Add sched_state field to struct rseq' RFC v2 thread, May 2023"
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
    source = "seed 003: Desnoyers and Weimer, 'rseq: Implement KTLS prototype for x86-64', Sept-Oct 2020"
    notes = (
        "The kernel places each thread's area itself (at thread creation); user space finds a field "
        "through an accessor (the model's rseq_offset(name) call, standing for the vDSO function), "
        "never through a fixed offset.",
        "The kernel's private layout: rseq_cs 0, cpu_id_start 8, cpu_id 12, flags 16, node_id 20, mm_cid 24.",
        "rseq(2) only sets the signature: the area argument must be the thread's KTLS area or NULL; "
        "EBUSY when already set, errors otherwise as Linux 6.3.",
    )
    offsets = {"rseq_cs": 0, "cpu_id_start": 8, "cpu_id": 12, "flags": 16, "node_id": 20, "mm_cid": 24}
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


_ALL = [Variant(), Linux63(), Linux70(), SizeFlag2020(), SchedState2023(), Ktls2020(), FreeBSD2021()]
VARIANTS: dict[str, Variant] = {v.name: v for v in _ALL}
