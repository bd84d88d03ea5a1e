"""The variants' own kernel rules in Promela, for ``rseq.model.spin``.

The generic kernel (scheduling, the event mask, ``rseq_ip_fixup``, the kill
of a system call inside a section) is written once in ``spin.Model._kernel``;
it calls the hooks below, which each variant's rules define:

==========================  ================================================
hook (Promela inline)       Python (``variants/*.py``)
==========================  ================================================
``registered(t)``           ``t.k["rseq"] is not None`` (a macro)
``update_ids_<tid>()``      ``Variant.update_ids`` (from ``resume``)
``on_switch_in(t)``         ``Machine._assign_cid``, ``on_switch(.., True)``
``on_switch_out(t)``        ``on_switch(.., False)``
``on_exit(t)``              ``on_exit``
``after_user_step(t)``      ``after_user_step``
``after_yield(t)``          ``after_yield`` (after a system call left the CPU)
``slice_intercepts(t, w)``  ``slice_intercepts_preemption`` (sets
                            ``intercepted``)
==========================  ================================================

and ``KernelRules.syscall`` writes the variant's system calls (``prctl``,
``rseq_slice_yield``, a grant revoked by a system call, seed 000's
registration).  Every rule is written here in Promela, from the variant's
documented behaviour and its options, not learned from the Python machine:
SPIN then checks the scenario against a second implementation of the
kernel.  What is computed in Python at export time is only what is constant
in a given model: a system call's arguments (they are fixed in the program's
step), addresses, whether a field is mapped, and the value numbering
(``mem`` holds numbers standing for the values, so a rule that computes on a
value, ``flags & RSEQ_CS_FLAG_SIZE`` or ``min(40, user_size)``, is a table
over the values the model can hold).
"""

from __future__ import annotations

from . import _abi
from ._machine import EV_PREEMPT

_NOCACHE = 255  # linux-7.0's idcache: no ID written since the registration


def _unsupported(why: str) -> Exception:
    from .spin import Unsupported  # spin imports this module

    return Unsupported(why)


class KernelRules:
    """Linux 4.18's and 6.3's rules, and FreeBSD's: the two CPU id fields
    written on return to user space, no other hook (the generic kernel in
    spin.Model._kernel is all of it)."""

    options: tuple[str, ...] = ()  # variant options the export knows
    tracks_kernel_writes = False  # writes every field the variant writes, for m.kernel_writes
    intercepts = False  # slice_intercepts can defer a preemption
    written_ids: tuple[str, ...] = ()  # of node_id and mm_cid, those written as the variant does
    # a thread's kernel state (t.k) the rules hold, for the learned rseq(2):
    # k_test and k_write give its Promela, or None where they cannot
    k_keys: tuple[str, ...] = ()
    registers = False  # exports threads that register themselves (rseq(2))
    syscalls: frozenset[str] = frozenset()  # system calls beyond the generic ones

    def __init__(self, model):
        self.model = model
        self.m = model.m
        self.variant = model.m.variant
        self.threads = model.m.threads

    # -- export phases
    def prepare(self, tb, fields) -> None:
        """Number the addresses and values the rules use (before the model
        sizes its arrays)."""
        self.tb = tb
        self.fields = fields

    def declare(self, w) -> None:
        w("#define registered(t) (reg[t] != 0)")
        w("#define intercepted 0")

    def init(self, w) -> None:
        pass

    def inlines(self, w) -> None:
        self.update_ids(w)
        for name in ("on_switch_in", "on_switch_out", "on_exit", "after_user_step",
                     "after_yield"):
            w(f"inline {name}(t) {{ skip }}")
        w("inline slice_intercepts(t, w) { skip }")

    def k_test(self, tid: int, key: str, value) -> str | None:
        return None

    def k_write(self, tid: int, key: str, value) -> str | None:
        return None

    def syscall(self, t, tid, step, branch_on, goto, default) -> str | None:
        """Promela for the system call ``step`` (its result fed through
        ``goto``/``branch_on``; ``leave = 1`` when the thread leaves its
        CPU), or None for the generic one (``default``)."""
        return None

    # -- helpers
    def per_thread(self, w, name: str, body, params: str = "t") -> None:
        """``inline name_<tid>()`` for each thread (``body(tid, i)``: its
        Promela, with its addresses as constants) and ``inline name(t)``
        dispatching on the thread."""
        extra = params.partition(",")[2].strip()
        for i, _ in enumerate(self.threads):
            w(f"inline {name}_{i + 1}({extra}) {{ {body(i + 1, i)} }}")
        w(f"inline {name}({params}) {{")
        w("  if")
        for i, _ in enumerate(self.threads):
            w(f"  :: t == {i + 1} -> {name}_{i + 1}({extra})")
        w("  fi")
        w("}")

    def writable(self, address: int, size: int = 4) -> bool:
        return self.m.accessible(address, size, True)

    def kernel_write(self, i: int, field: str, size: int = 4, address: int | None = None) -> str:
        """``; kw = kw | bit``: a kernel write of thread ``i``'s ``field``
        for a check_step that reads ``m.kernel_writes``, or "" when none
        does.  Rules that do not write every field the Python variant
        writes (node_id, mm_cid) cannot track them: Unsupported."""
        if not self.model.track_kw:
            return ""
        if not self.tracks_kernel_writes:
            raise _unsupported("check_step reads the kernel's writes, which the export of "
                               f"{self.model.variant} does not track")
        t = self.threads[i]
        if address is None:
            address = t.ctx.area + self.variant.offsets[field]
        return f"; kw = kw | {1 << self.model.kw_bit((address, size, field, t.tid))}"

    def update_ids(self, w) -> None:
        """Variant.update_ids: cpu_id_start and cpu_id (a CPU's value
        number is the CPU).  node_id and mm_cid are not written: no
        exported program reads them (``spin`` refuses one that does)."""
        self.per_thread(w, "update_ids", lambda tid, i: (
            f"mem[{self.fields[i]['cpu_id_start']}] = cpu[{tid}]; "
            f"mem[{self.fields[i]['cpu_id']}] = cpu[{tid}]"))


# ---------------------------------------------------------------- seed 001


class SchedStateRules(KernelRules):
    """sched-state-2023 (seed 001): the kernel writes ``sched_state`` (bit 0:
    on a CPU) in the thread's shared area on every switch in and out, and
    clears it when the thread exits."""

    k_keys = ("extra",)

    def prepare(self, tb, fields) -> None:
        super().prepare(tb, fields)
        self.shared = []  # the address number of each thread's sched_state, or None
        self.areas = []
        for t in self.threads:
            # the shared area is the one the thread starts registered with:
            # a constant (a registration by the program may only keep it,
            # k_write)
            extra = t.k["extra"]
            area = extra[0] if t.k["rseq"] is not None and extra and extra[0] else 0
            self.areas.append(area)
            self.shared.append(tb.a(area) if area and self.writable(area) else None)
        tb.v(0)
        tb.v(_abi.SCHED_STATE_ON_CPU)

    def k_write(self, tid: int, key: str, value) -> str | None:
        """A registration's shared area (``extra``) as the learned rseq(2)
        sets it: held when it is the thread's constant one (none: () or
        (0,) where the thread has none)."""
        area = self.areas[tid - 1]
        if value == (area,) or (area == 0 and value == ()):
            return "skip"
        return None

    def _write(self, on: bool):
        value = self.tb.v(_abi.SCHED_STATE_ON_CPU if on else 0)

        def body(tid, i):
            a = self.shared[i]
            return "skip" if a is None else f"mem[{a}] = {value}"
        return body

    def inlines(self, w) -> None:
        self.update_ids(w)
        self.per_thread(w, "on_switch_in", self._write(True))
        self.per_thread(w, "on_switch_out", self._write(False))
        self.per_thread(w, "on_exit", self._write(False))
        for name in ("after_user_step", "after_yield"):
            w(f"inline {name}(t) {{ skip }}")
        w("inline slice_intercepts(t, w) { skip }")


# ---------------------------------------------------------------- Linux 7.0


class SliceRules(KernelRules):
    """linux-7.0: optimised registrations (IDs written only when they
    change, a thread that wrote one is killed) and the time-slice extension:
    a preemption of a thread whose ``slice_ctrl.request`` is set is
    deferred (request cleared, granted set) for ``slice_steps`` user steps;
    the grant ends by ``rseq_slice_yield()``, by any other system call
    (unless ``revoke_on_syscall=False``) or when its steps run out, and the
    deferred preemption then happens (the preempting thread, if it is
    waiting, runs on the CPU)."""

    options = ("revoke_on_syscall", "slice_steps", "slice_disabled_at_boot")
    syscalls = frozenset({"prctl", "rseq_slice_yield"})

    k_keys = ("extra", "slice")

    @property
    def intercepts(self) -> bool:
        return self.slices

    def _mode(self, i: int) -> str:
        """The registration mode update_ids is written for (legacy unless
        the thread starts registered in optimised mode)."""
        extra = self.threads[i].k["extra"]
        return "optimised" if extra and extra[0] == "optimised" else "legacy"

    def k_test(self, tid: int, key: str, value) -> str | None:
        if key == "slice":
            enabled, left, pending = value
            return (f"(slen[{tid}] == {int(enabled)} && sleft[{tid}] == {left} && "
                    f"spend[{tid}] == {pending or 0})")
        return None

    def k_write(self, tid: int, key: str, value) -> str | None:
        """What Linux70.before_activate and _unregister set: the slice
        state, and the registration mode with its empty ID cache (the mode
        must be the one update_ids is written for)."""
        if key == "slice":
            enabled, left, pending = value
            return (f"slen[{tid}] = {int(enabled)}; sleft[{tid}] = {left}; "
                    f"spend[{tid}] = {pending or 0}")
        if value == () or (value[0] == self._mode(tid - 1) and value[1] == ()):
            return f"idcache[{tid}] = NOCACHE"
        return None

    def prepare(self, tb, fields) -> None:
        super().prepare(tb, fields)
        self.slice = []
        for t in self.threads:
            area = t.ctx.area
            request = area + _abi.OFF_SLICE_REQUEST
            granted = area + _abi.OFF_SLICE_GRANTED
            if not (self.writable(request, 1) and self.writable(granted, 1)):
                raise _unsupported(f"{t.name}'s slice_ctrl is not mapped")
            self.slice.append((tb.a(request), tb.a(granted), tb.a(area + _abi.OFF_FLAGS)))
        for t in self.threads:
            for step in t.table.steps:
                addr = getattr(step, "addr", None)
                if type(step).__name__ in ("Store", "Cas") and addr in {
                    t.ctx.area + self.variant.offsets[f] for f in ("node_id", "mm_cid")
                }:
                    raise _unsupported(f"{t.name} writes {self.m.sym(addr)} (not exported)")
        # whether a slice can ever be granted: a thread registered with the
        # extension on, or a prctl that enables it; else the slice rules are
        # left out (less code in every move: SPIN allows 2048 jumps in a
        # d_step)
        enable = (_abi.PR_RSEQ_SLICE_EXTENSION, _abi.PR_RSEQ_SLICE_EXTENSION_SET)
        default_on = any(
            type(step).__name__ == "Syscall" and step.name == "rseq" and len(step.args) > 2
            and step.args[2] & _abi.FLAG_SLICE_EXT_DEFAULT_ON
            for t in self.threads for step in t.table.steps)
        self.slices = default_on or any(t.k["slice"][0] for t in self.threads) or any(
            type(step).__name__ == "Syscall" and step.name == "prctl"
            and tuple(step.args[:2]) == enable and len(step.args) > 2
            and step.args[2] & _abi.PR_RSEQ_SLICE_EXT_ENABLE
            for t in self.threads for step in t.table.steps)
        for value in (0, 1, -_abi.EINVAL, -_abi.ENXIO, -_abi.ENOTSUPP, -_abi.ENOSYS,
                      _abi.FLAGS_SLICE_EXT_AVAILABLE,
                      _abi.FLAGS_SLICE_EXT_AVAILABLE | _abi.FLAGS_SLICE_EXT_ENABLED):
            tb.v(value)

    def declare(self, w) -> None:
        w("#define registered(t) (reg[t] != 0)")
        w(f"#define SLICE_STEPS {self.variant.slice_steps}")
        w(f"#define NOCACHE {_NOCACHE}")
        n = len(self.threads) + 1
        w(f"bit slen[{n}]; byte sleft[{n}]; byte spend[{n}];  /* the slice: enabled, "
          "steps left of a grant, the preempting thread (0: another task) */")
        w(f"byte idcache[{n}];  /* optimised mode: the CPU id last written */")
        if self.slices:
            w("hidden byte intercepted; hidden byte handoff; hidden byte inc; hidden byte yc;")
        else:
            w("#define intercepted 0  /* no slice can be granted */")

    def init(self, w) -> None:
        for tid, t in enumerate(self.threads, 1):
            enabled, left, pending = t.k["slice"]
            extra = t.k["extra"]
            cached = extra[1] if extra and extra[0] == "optimised" and extra[1] else ()
            cache = cached[0] if cached else _NOCACHE
            w(f"    slen[{tid}] = {int(enabled)}; sleft[{tid}] = {left}; "
              f"spend[{tid}] = {pending or 0}; idcache[{tid}] = {cache};")

    def inlines(self, w) -> None:
        tb = self.tb
        # Linux70.update_ids: legacy (32-byte) registrations as Linux 6.3;
        # optimised ones check that user space left the IDs alone, then
        # write the ones that changed
        def ids(tid, i):
            t = self.threads[i]
            f = self.fields[i]
            extra = t.k["extra"]
            if not extra or extra[0] != "optimised":
                return f"mem[{f['cpu_id_start']}] = cpu[{tid}]; mem[{f['cpu_id']}] = cpu[{tid}]"
            return (f"if :: idcache[{tid}] != NOCACHE && (mem[{f['cpu_id_start']}] != "
                    f"idcache[{tid}] || mem[{f['cpu_id']}] != idcache[{tid}]) -> kill() "
                    f":: else -> if :: cpu[{tid}] != idcache[{tid}] -> "
                    f"mem[{f['cpu_id_start']}] = cpu[{tid}]; mem[{f['cpu_id']}] = cpu[{tid}] "
                    f":: else -> skip fi; idcache[{tid}] = cpu[{tid}] fi")
        self.per_thread(w, "update_ids", ids)
        for name in ("on_switch_in", "on_switch_out", "on_exit"):
            w(f"inline {name}(t) {{ skip }}")
        if not self.slices:
            for name in ("after_user_step", "after_yield", "revoke"):
                w(f"inline {name}(t) {{ skip }}")
            w("inline slice_intercepts(t, w) { skip }")
            return
        one, zero = tb.v(1), tb.v(0)
        # _revoke: granted cleared, the grant over; the deferred preemption
        # hands the CPU to the thread that asked for it (or back to t)
        self.per_thread(w, "revoke", lambda tid, i: (
            f"mem[{self.slice[i][1]}] = {zero}; "
            f"handoff = (spend[{tid}] == 0 -> {tid} : spend[{tid}]); "
            f"sleft[{tid}] = 0; spend[{tid}] = 0"))
        # slice_intercepts_preemption
        self.per_thread(w, "slice_intercepts", lambda tid, i: (
            f"intercepted = 0; "
            f"if :: registered({tid}) && slen[{tid}] && sleft[{tid}] > 0 -> intercepted = 1 "
            f":: registered({tid}) && slen[{tid}] && sleft[{tid}] == 0 && "
            f"mem[{self.slice[i][0]}] != {zero} -> "
            f"mem[{self.slice[i][0]}] = {zero}; mem[{self.slice[i][1]}] = {one}; "
            f"sleft[{tid}] = SLICE_STEPS; spend[{tid}] = w; intercepted = 1 "
            f":: else -> skip fi"), params="t, w")
        # after_yield: the deferred preemption's thread runs on the CPU t left
        w("inline after_yield(t) {")
        w("  if :: handoff != 0 -> inc = handoff; handoff = 0; yc = last[t];")
        w("     if :: status[inc] == 0 && cpu[inc] == NOCPU && cpus[yc] == 0 && hasstep(inc) ->")
        w("          schedule_in(inc, yc)")
        w("     :: else -> skip fi")
        w("  :: else -> skip fi")
        w("}")
        # after_user_step: a grant counts down in user steps; when it runs
        # out, the grant is revoked and the thread switched out
        w("inline after_user_step(t) {")
        w("  if :: sleft[t] > 0 && cpu[t] != NOCPU -> sleft[t]--;")
        w("     if :: sleft[t] == 0 -> revoke(t); "
          f"switch_out(t, {EV_PREEMPT}); yielded = 1 :: else -> skip fi")
        w("  :: else -> skip fi")
        w("}")

    def syscall(self, t, tid, step, branch_on, goto, default) -> str | None:
        name = step.name
        if not self.slices:  # no grant to end or revoke
            return self._prctl(t, tid, step, goto) if name == "prctl" else (
                goto(0) if name == "rseq_slice_yield" else None)
        if name == "rseq_slice_yield":
            return (f"if :: sleft[{tid}] > 0 -> revoke({tid}); {goto(0)}; leave = 1 "
                    f":: else -> {goto(0)} fi")
        own = self._prctl(t, tid, step, goto) if name == "prctl" else default
        if own is None:
            return None
        if not self.variant.options.get("revoke_on_syscall", True):
            return own
        # a grant is revoked by any system call: the call runs as the base
        # variant's (prctl is not one of those: -ENOSYS), then the thread
        # leaves its CPU
        base = default if default is not None else goto(-_abi.ENOSYS)
        return (f"if :: sleft[{tid}] > 0 -> revoke({tid}); {base}; leave = 1 "
                f":: else -> {own} fi")

    def _prctl(self, t, tid, step, goto) -> str:
        """Linux70.sys_prctl with the step's constant arguments."""
        option, cmd, arg = (tuple(step.args) + (0, 0, 0))[:3]
        if option != _abi.PR_RSEQ_SLICE_EXTENSION:
            return goto(-_abi.EINVAL)
        if cmd == _abi.PR_RSEQ_SLICE_EXTENSION_GET:
            return f"if :: slen[{tid}] -> {goto(1)} :: else -> {goto(0)} fi"
        if cmd != _abi.PR_RSEQ_SLICE_EXTENSION_SET or arg & ~_abi.PR_RSEQ_SLICE_EXT_ENABLE:
            return goto(-_abi.EINVAL)
        if self.variant.options.get("slice_disabled_at_boot"):
            action = goto(-_abi.ENOTSUPP)
        else:
            enabled = bool(arg & _abi.PR_RSEQ_SLICE_EXT_ENABLE)
            advert = _abi.FLAGS_SLICE_EXT_AVAILABLE | (
                _abi.FLAGS_SLICE_EXT_ENABLED if enabled else 0)
            i = tid - 1
            if not self.writable(self.threads[i].ctx.area + _abi.OFF_FLAGS):
                action = goto(-_abi.EFAULT)
            else:
                action = (f"mem[{self.slice[i][2]}] = {self.tb.v(advert)}; "
                          f"slen[{tid}] = {int(enabled)}; sleft[{tid}] = 0; spend[{tid}] = 0; "
                          + goto(0))
        return f"if :: !registered({tid}) -> {goto(-_abi.ENXIO)} :: else -> {action} fi"


# ---------------------------------------------------------------- seed 000


class SizeFlagRules(KernelRules):
    """size-flag-2020 (seed 000): a thread registers itself; with
    ``negotiate`` the kernel reads ``RSEQ_CS_FLAG_SIZE`` and ``user_size``
    from the area and writes ``kernel_size = min(40, user_size)`` (32
    without the flag), without it the kernel trusts ``rseq_len``; the IDs
    written on return to user space are those that fit in
    ``kernel_size``: ``node_id`` at 32, ``mm_cid`` at 36."""

    options = ("negotiate",)
    registers = True
    tracks_kernel_writes = True
    written_ids = ("node_id", "mm_cid")
    syscalls = frozenset({"rseq"})

    def prepare(self, tb, fields) -> None:
        super().prepare(tb, fields)
        v = self.variant
        self.registrations = []
        for t in self.threads:
            for args in self._calls(t):
                if args[2] & _abi.FLAG_UNREGISTER:
                    raise _unsupported(f"{t.name} unregisters (not exported under {v.name})")
                if args[0] != t.ctx.area:
                    raise _unsupported(f"{t.name} registers another area than its own")
            area = t.ctx.area
            extra = {}
            for name in ("flags", "user_size", "kernel_size", "node_id", "mm_cid"):
                address = area + v.offsets[name]
                extra[name] = tb.a(address) if self.m.accessible(address, 4, False) else None
            self.registrations.append(extra)
        # whether any thread can get a kernel_size that covers node_id: a
        # registration at the start, or a call (negotiated: any user_size)
        negotiate = self.variant.options.get("negotiate", True)
        self.wide = any(
            t.k["rseq"] is not None and t.k["extra"] and t.k["extra"][0] > _abi.SF_OFF_NODE_ID
            or any(negotiate or call[1] & 0xFFFFFFFF > _abi.SF_OFF_NODE_ID
                   for call in self._calls(t))
            for t in self.threads)
        self.nodes = [tb.v(node) for node in self.m.nodes]
        self.cids = [tb.v(c) for c in range(len(self.threads) + 1)]
        for value in (0, -_abi.EINVAL, -_abi.EBUSY, -_abi.EFAULT, -_abi.EPERM, _abi.ORIG_SIZE):
            tb.v(value)
        # kernel_size = min(40, user_size) over every value the model holds
        for value in list(tb.values):
            if isinstance(value, int) and not isinstance(value, bool):
                tb.v(min(_abi.SF_KERNEL_SIZE, value))

    @staticmethod
    def _calls(t) -> set:
        """The arguments of the thread's rseq(2) calls."""
        return {tuple(s.args) + (0,) * (4 - len(s.args)) for s in t.table.steps
                if type(s).__name__ == "Syscall" and s.name == "rseq"}

    def declare(self, w) -> None:
        n = len(self.threads) + 1
        w("#define registered(t) (reg[t] != 0)")
        w("#define intercepted 0")
        w(f"byte ksize[{n}];  /* kernel_size (bytes) */")
        if self.wide:
            w(f"byte cid[{n}];  /* mm_cid, {len(self.threads) + 1}: none */")
        w("hidden short ks; hidden byte clash; hidden byte flagged; hidden byte j; "
          "hidden byte freecid;")

    def init(self, w) -> None:
        for tid, t in enumerate(self.threads, 1):
            registered = t.k["rseq"] is not None
            ks = t.k["extra"][0] if registered and t.k["extra"] else 0
            cid = t.k["mm_cid"]
            w(f"    ksize[{tid}] = {ks};")
            if self.wide:
                w(f"    cid[{tid}] = {len(self.threads) + 1 if cid is None else cid};")

    def inlines(self, w) -> None:
        tb = self.tb
        n = len(self.threads)
        # SizeFlag2020.id_fields: cpu_id_start, cpu_id, then the new fields
        # that fit in kernel_size; a field the kernel cannot write kills
        def ids(tid, i):
            f = self.fields[i]
            reg = self.registrations[i]
            kw = self.kernel_write
            out = [f"mem[{f['cpu_id_start']}] = cpu[{tid}]{kw(i, 'cpu_id_start')}",
                   f"mem[{f['cpu_id']}] = cpu[{tid}]{kw(i, 'cpu_id')}"]
            if not self.wide:  # kernel_size stays below node_id's end
                return "; ".join(out)
            # node_id, then mm_cid unless writing node_id killed the process
            for field, offset, value, guard in (
                    ("node_id", _abi.SF_OFF_NODE_ID, f"node_value(cpu[{tid}])", ""),
                    ("mm_cid", _abi.SF_OFF_MM_CID, f"cid_value(cid[{tid}])", "!killed && ")):
                slot = reg[field]
                address = self.threads[i].ctx.area + offset
                write = (f"{value}; mem[{slot}] = ks{kw(i, field)}"
                         if slot is not None and self.writable(address) else "kill()")
                out.append(f"if :: {guard}ksize[{tid}] >= {offset + 4} -> {write} "
                           ":: else -> skip fi")
            return "; ".join(out)
        w("inline node_value(c) {")
        w("  if")
        for c, number in enumerate(self.nodes):
            w(f"  :: c == {c} -> ks = {number}")
        w("  fi")
        w("}")
        w("inline cid_value(x) {")
        w("  if")
        for c, number in enumerate(self.cids):
            w(f"  :: x == {c} -> ks = {number}")
        w("  fi")
        w("}")
        self.per_thread(w, "update_ids", ids)
        # Machine._assign_cid: keep the thread's id while no other running
        # thread holds it, else take the smallest free one (only where
        # mm_cid can be written)
        w("inline on_switch_in(t) {")
        if self.wide:
            w(f"  clash = (cid[t] == {n + 1}); j = 1;")
            w(f"  do :: j <= {n} -> if :: j != t && cpu[j] != NOCPU && cid[j] == cid[t] -> "
              "clash = 1 :: else -> skip fi; j++")
            w("  :: else -> break od;")
            w("  if :: clash -> freecid = 0;")
            w("     do :: true -> clash = 0; j = 1;")
            w(f"          do :: j <= {n} -> if :: j != t && cpu[j] != NOCPU && "
              "cid[j] == freecid -> clash = 1 :: else -> skip fi; j++ :: else -> break od;")
            w("          if :: clash -> freecid++ :: else -> break fi")
            w("     od;")
            w("     cid[t] = freecid")
            w("  :: else -> skip fi")
        else:
            w("  skip")
        w("}")
        for name in ("on_switch_out", "on_exit", "after_user_step", "after_yield"):
            w(f"inline {name}(t) {{ skip }}")
        w("inline slice_intercepts(t, w) { skip }")
        # flags & RSEQ_CS_FLAG_SIZE, and min(40, user_size), as tables
        w("inline size_flag(x) {")
        w("  if")
        for value, number in tb.values.items():
            if isinstance(value, int) and not isinstance(value, bool) and value & _abi.SIZE_FLAG:
                w(f"  :: x == {number} -> flagged = 1")
        w("  :: else -> flagged = 0")
        w("  fi")
        w("}")
        w("inline negotiated(x) {")
        w("  if")
        for value, number in tb.values.items():
            if isinstance(value, int) and not isinstance(value, bool):
                size = min(_abi.SF_KERNEL_SIZE, value)
                if 0 <= size < 256:
                    w(f"  :: x == {number} -> ks = {size}")
        w("  :: else -> ks = 0")
        w("  fi")
        w("}")
        w("inline ks_value(x) {")
        w("  if")
        for size in sorted({min(_abi.SF_KERNEL_SIZE, v) for v in tb.values
                            if isinstance(v, int) and not isinstance(v, bool)}):
            if 0 <= size < 256:
                w(f"  :: x == {size} -> val = {tb.v(size)}")
        w("  fi")
        w("}")

    def syscall(self, t, tid, step, branch_on, goto, default) -> str | None:
        if step.name != "rseq":
            return None
        return self._register(t, tid, step, goto)

    def _register(self, t, tid, step, goto) -> str:
        """Variant.sys_rseq then SizeFlag2020's rules, for the step's
        constant arguments (a registration of the thread's own area)."""
        v = self.variant
        area, length, flags, sig = (tuple(step.args) + (0, 0, 0, 0))[:4]
        length &= 0xFFFFFFFF
        sig &= 0xFFFFFFFF
        self._sig = sig
        if flags & ~(v.allowed_flags & ~_abi.FLAG_UNREGISTER):
            return goto(-_abi.EINVAL)
        # re-registration (Variant.sys_rseq): EINVAL for another area or
        # length, EPERM for another signature, else EBUSY; the registrations
        # a thread can hold are its initial one and those its calls make
        held = {t.k["rseq"]} | {(a, ln & 0xFFFFFFFF, sg & 0xFFFFFFFF)
                                for a, ln, _, sg, *_ in self._calls(t)}
        alts = []
        for registration in sorted(held - {None}):
            if registration[0] != area or registration[1] != length:
                outcome = goto(-_abi.EINVAL)
            elif registration[2] != sig:
                outcome = goto(-_abi.EPERM)
            else:
                outcome = goto(-_abi.EBUSY)
            alts.append(f":: reg[{tid}] == {self.model.reg_number(registration)} -> {outcome}")
        again = "if " + " ".join(alts) + " :: else -> incomplete = 1 fi"
        # SizeFlag2020.registration_rule and _access_ok
        if not (length >= _abi.ORIG_SIZE and area % _abi.ORIG_ALIGN == 0):
            first = goto(-_abi.EINVAL)
        elif area + length > _abi.TASK_SIZE:
            first = goto(-_abi.EFAULT)
        else:
            first = self._activate(t, tid, length, goto)
        return f"if :: registered({tid}) -> {again} :: else -> {first} fi"

    def _activate(self, t, tid, length, goto) -> str:
        """SizeFlag2020.before_activate, then the registration itself."""
        i = tid - 1
        reg = self.registrations[i]
        number = self.model.reg_number((t.ctx.area, length, self._sig))
        done = f"reg[{tid}] = {number}; ksize[{tid}] = ks; notify[{tid}] = 1; {goto(0)}"
        if not self.variant.options.get("negotiate", True):
            return f"ks = {min(_abi.SF_KERNEL_SIZE, length)}; {done}"
        if reg["flags"] is None:
            return goto(-_abi.EFAULT)
        if reg["user_size"] is None:
            with_flag = goto(-_abi.EFAULT)
        else:
            address = t.ctx.area + _abi.SF_OFF_KERNEL_SIZE
            if reg["kernel_size"] is None or not self.writable(address):
                with_flag = goto(-_abi.EFAULT)
            else:
                with_flag = (f"negotiated(mem[{reg['user_size']}]); ks_value(ks); "
                             f"mem[{reg['kernel_size']}] = val"
                             f"{self.kernel_write(i, 'kernel_size')}; {done}")
        return (f"size_flag(mem[{reg['flags']}]); "
                f"if :: flagged -> {with_flag} :: else -> ks = {_abi.ORIG_SIZE}; {done} fi")


VARIANT_RULES = {
    "sched-state-2023": SchedStateRules,
    "linux-7.0": SliceRules,
    "size-flag-2020": SizeFlagRules,
}


def rules_for(model) -> KernelRules:
    return VARIANT_RULES.get(model.variant, KernelRules)(model)
