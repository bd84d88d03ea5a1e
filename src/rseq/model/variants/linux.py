"""The Linux kernels: 4.18 (the base class itself), 6.3's extensible ABI
with node_id and mm_cid, and 7.0's time-slice extension."""

from __future__ import annotations

from .. import _abi
from .._machine import EV_PREEMPT, Machine, Thread
from .._program import Syscall
from ._base import Variant


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
        "Registration reads rseq_cs (EFAULT when the area is unreadable) "
        "and clears a non-zero one.",
        "node_id and mm_cid are written with the CPU ids on every return after an event.",
        "membarrier PRIVATE_EXPEDITED_RSEQ restarts the other threads' critical sections.",
    )
    feature_size = 28
    align = 32
    offsets = {
        "cpu_id_start": 0,
        "cpu_id": 4,
        "rseq_cs": 8,
        "flags": 16,
        "node_id": 20,
        "mm_cid": 24,
    }
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
        "Slice extension: prctl(PR_RSEQ_SLICE_EXTENSION, SET, ENABLE) or "
        "RSEQ_FLAG_SLICE_EXT_DEFAULT_ON; a preemption of a thread whose slice_ctrl.request is "
        "set is deferred: granted=1 for a bounded number of steps; rseq_slice_yield() ends the "
        "grant; any other system call revokes it.",
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
        if not (
            m.put_user(t, area + 28, 0, 1, "slice_request")
            and m.put_user(t, area + 29, 1, 1, "slice_granted")
        ):
            m.kill(t, "cannot write slice_ctrl")
        t.k["slice"] = (True, self.slice_steps, incoming)
        m.say(
            f"        sched: preempt {t.name} deferred: "
            f"slice extension granted for {self.slice_steps} steps"
        )
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

    def sys_prctl(
        self, m: Machine, t: Thread, option: int, cmd: int = 0, arg: int = 0, *rest
    ) -> int:
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


VARIANTS = (Variant(), Linux63(), Linux70())
