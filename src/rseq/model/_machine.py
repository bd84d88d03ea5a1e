"""The model machine: memory, CPUs, threads, the scheduler's moves, and the
generic half of the kernel (return to user space, faults, kills).  What is
specific to an ABI design lives in the variant (``variants``).

A machine's whole state is plain data (dicts of ints, tuples) plus each
thread's generator stack.  ``snapshot()``/``restore()`` save and load the
data; generators are rebuilt by replaying the results a thread received
(``Thread.history``).  ``key()`` hashes memory, kernel state and the
generator frames (code position and locals), so equivalent states reached
by different schedules are recognised.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _abi
from ._program import (
    PRIMITIVES,
    Abort,
    Cas,
    Choose,
    Context,
    CriticalSection,
    Load,
    Mark,
    Store,
    Syscall,
)

OUTSIDE_IP = 0x1000  # where a thread is when its next step carries no ip

# event mask bits, as the kernel's rseq_event_mask
EV_PREEMPT = 1
EV_SIGNAL = 2
EV_MIGRATE = 4

TEXT_BASE = 0x400000
RODATA_BASE = 0x500000
DATA_BASE = 0x600000
TLS_BASE = 0x7F0000000000

# system calls whose effect is confined to the calling thread
_PRIVATE_SYSCALLS = frozenset({"getpid", "getcpu", "rseq_offset", "nop", "write"})

_SIMPLE = (int, str, bool, float, type(None), tuple, frozenset, bytes)


@dataclass(frozen=True)
class Region:
    start: int
    size: int
    perm: str  # "rw", "r" or "" (PROT_NONE)
    name: str

    @property
    def end(self) -> int:
        return self.start + self.size


class Killed(Exception):
    """Raised inside the machine when the process dies (SIGSEGV)."""


class Thread:
    __slots__ = (
        "tid",
        "name",
        "program",
        "ctx",
        "k",
        "stack",
        "history",
        "handler",
        "_fkey",
        "private",
    )

    def __init__(self, tid: int, name: str, program: Callable | None, ctx: Context | None):
        self.tid = tid
        self.name = name
        self.program = program
        self.ctx = ctx
        self.handler: Callable | None = None
        # kernel-side state: only hashable values, copied on snapshot
        self.k: dict[str, Any] = {
            "status": "run",  # run, exit, killed
            "cpu": None,
            "last_cpu": None,
            "rseq": None,  # (area, length, signature) when registered
            "extra": (),  # variant-specific registration state
            "notify": False,  # TIF_NOTIFY_RESUME
            "events": 0,
            "slice": (False, 0, None),  # (enabled, steps left of a grant, preempter)
            "mm_cid": None,
        }
        self.stack: list[list] = []
        self.history: tuple = ()
        self._fkey: tuple | None = None
        self.private: tuple = ()  # (start, end) ranges only this thread touches

    # -- program side
    def start(self) -> None:
        self._fkey = None
        self.stack = []
        self.history = ()
        if self.program is None:
            return
        gen = self.program(self.ctx)
        self._push(gen)

    def _push(self, gen) -> None:
        try:
            step = next(gen)
        except StopIteration:
            return
        self.stack.append([gen, step])

    def feed(self, event: tuple) -> None:
        """Apply one history event to the generator stack."""
        self._fkey = None
        kind = event[0]
        if kind == "h":
            self._push(self.handler(self.ctx))
        else:
            frame = self.stack[-1]
            try:
                if kind == "s":
                    frame[1] = frame[0].send(event[1])
                else:  # "t": abort
                    frame[1] = frame[0].throw(Abort())
            except StopIteration:
                self.stack.pop()
        self.history = self.history + (event,)

    def replay(self, history: tuple) -> None:
        self.start()
        for event in history:
            self.feed(event)
        self.history = history

    @property
    def next_step(self):
        return self.stack[-1][1] if self.stack else None

    def ip(self) -> int:
        step = self.next_step
        if step is None or step.ip is None:
            return OUTSIDE_IP
        return step.ip

    def frame_key(self) -> tuple:
        if self._fkey is None:
            self._fkey = self._frame_key()
        return self._fkey

    def invisible(self, step) -> bool:
        """A step that only this thread can observe: it commutes with every
        other thread's step, so the explorer need not interleave around it
        (only kernel events aimed at this thread)."""
        cls = type(step)
        if cls is Load or cls is Store:
            addr = step.addr
            return any(start <= addr < end for start, end in self.private)
        if cls is Choose:
            return True
        if cls is Syscall:
            return step.name in _PRIVATE_SYSCALLS
        return False

    def _frame_key(self) -> tuple:
        out = []
        for gen, _ in self.stack:
            g = gen
            while g is not None:
                frame = g.gi_frame
                if frame is None:
                    break
                loc = tuple(
                    (n, v if isinstance(v, _SIMPLE) else id(v)) for n, v in frame.f_locals.items()
                )
                out.append((g.gi_code, frame.f_lasti, loc))
                g = g.gi_yieldfrom if isinstance(g.gi_yieldfrom, types.GeneratorType) else None
        return tuple(out)

    @property
    def alive(self) -> bool:
        return self.k["status"] == "run"


class Machine:
    """A model computer running one process under one ABI variant."""

    def __init__(self, variant, ncpus: int = 2, nodes: tuple | None = None):
        self.variant = variant
        self.ncpus = ncpus
        self.nodes = nodes or tuple(0 for _ in range(ncpus))
        self.memory: dict[int, int] = {}  # writable user memory
        self.rodata: dict[int, int] = {}  # text and read-only data
        self.regions: tuple[Region, ...] = ()
        self.symbols: dict[int, str] = {}
        self.threads: list[Thread] = []
        self.cpus: list[int | None] = [None] * ncpus
        self.ghost: dict[Any, Any] = {}  # scenario bookkeeping, part of the state
        self.used = [0, 0, 0]  # preemptions, migrations, signals
        self.killed: str | None = None
        self.membarrier_registered = False
        self.steps = 0
        self.log: list[str] | None = None
        self.reduce = True  # partial-order reduction of thread-private steps
        self.kernel_writes: list[tuple] = []  # (addr, size, field, tid) since last check
        self._next_data = DATA_BASE
        self._next_text = TEXT_BASE
        self._next_rodata = RODATA_BASE
        self.sections: dict[str, CriticalSection] = {}

    # ------------------------------------------------------------ memory
    def map(self, name: str, start: int, size: int, perm: str = "rw") -> Region:
        region = Region(start, size, perm, name)
        self.regions = tuple(sorted(self.regions + (region,), key=lambda r: r.start))
        self.symbols.setdefault(start, name)
        return region

    def unmap(self, start: int) -> None:
        self.regions = tuple(r for r in self.regions if r.start != start)

    def protect(self, start: int, perm: str) -> None:
        self.regions = tuple(
            Region(r.start, r.size, perm, r.name) if r.start == start else r for r in self.regions
        )

    def alloc(self, name: str, size: int, align: int = 8, perm: str = "rw") -> int:
        addr = -(-self._next_data // align) * align
        self._next_data = addr + size
        self.map(name, addr, size, perm)
        return addr

    def name(self, addr: int, name: str) -> None:
        self.symbols[addr] = name

    def region_of(self, addr: int) -> Region | None:
        for r in self.regions:
            if r.start <= addr < r.end:
                return r
        return None

    def accessible(self, addr: int, size: int, write: bool) -> bool:
        r = self.region_of(addr)
        if r is None or addr + size > r.end:
            # an access may span adjacent regions
            if r is None:
                return False
            return self.accessible(r.end, addr + size - r.end, write) and (
                "w" in r.perm if write else "r" in r.perm
            )
        return "w" in r.perm if write else "r" in r.perm

    def read(self, addr: int) -> int:
        v = self.memory.get(addr)
        if v is None:
            v = self.rodata.get(addr, 0)
        return v

    def sym(self, addr: int) -> str:
        if addr in self.symbols:
            return self.symbols[addr]
        r = self.region_of(addr)
        if r is not None:
            return f"{r.name}+{addr - r.start}"
        return hex(addr)

    def value(self, v) -> str:
        """A value for a trace: pointers to named objects by name."""
        if isinstance(v, int) and v >= TEXT_BASE:
            if RODATA_BASE <= v < DATA_BASE and v in self.symbols:
                return f"&{self.symbols[v]}"
            r = self.region_of(v)
            if r is not None and v == r.start:
                return f"&{r.name}"
        return str(v)

    # kernel accessors: fail (None / False) instead of killing
    def get_user(self, addr: int, size: int = 4) -> int | None:
        if addr >= _abi.TASK_SIZE or not self.accessible(addr, size, False):
            return None
        return self.read(addr)

    def put_user(self, t: Thread, addr: int, value: int, size: int = 4, field: str = "") -> bool:
        if addr >= _abi.TASK_SIZE or not self.accessible(addr, size, True):
            return False
        self.memory[addr] = value
        self.kernel_writes.append((addr, size, field, t.tid))
        return True

    # ------------------------------------------------------------ text
    def define_sections(
        self, signature: int, extra: dict | None = None
    ) -> dict[str, CriticalSection]:
        """Lay out one critical section per primitive: descriptor in
        read-only data, the instructions in the text, and the signature in
        the 4 bytes before the abort handler."""
        for name, length in {**PRIMITIVES, **(extra or {})}.items():
            start = self._next_text + 0x10
            post = start + length
            abort = post + 0x10
            self._next_text = abort + 0x20
            desc = self._next_rodata
            self._next_rodata += _abi.CS_SIZE
            self.rodata[desc + _abi.CS_OFF_VERSION] = 0
            self.rodata[desc + _abi.CS_OFF_FLAGS] = 0
            self.rodata[desc + _abi.CS_OFF_START_IP] = start
            self.rodata[desc + _abi.CS_OFF_POST_COMMIT_OFFSET] = post - start
            self.rodata[desc + _abi.CS_OFF_ABORT_IP] = abort
            self.rodata[abort - 4] = signature
            self.symbols[desc] = f"cs_{name}"
            self.sections[name] = CriticalSection(name, desc, start, post, abort)
        self.map("text", TEXT_BASE, self._next_text - TEXT_BASE + 0x100, "r")
        self.map("rodata", RODATA_BASE, self._next_rodata - RODATA_BASE + 0x100, "r")
        return self.sections

    # ------------------------------------------------------------ threads
    def add_thread(self, name: str, program: Callable | None, ctx: Context | None) -> Thread:
        t = Thread(len(self.threads) + 1, name, program, ctx)
        self.threads.append(t)
        return t

    def thread(self, tid: int) -> Thread:
        return self.threads[tid - 1]

    def say(self, text: str) -> None:
        if self.log is not None:
            self.log.append(text)

    def kill(self, t: Thread, reason: str) -> None:
        """SIGSEGV: its default action ends the whole process."""
        self.say(f"        kernel: SIGSEGV to {t.name}: {reason}; the process dies")
        self.killed = f"{t.name} killed by SIGSEGV: {reason}"
        for other in self.threads:
            if other.k["status"] == "run":
                other.k["status"] = "killed"
                other.k["cpu"] = None
        self.cpus = [None] * self.ncpus
        raise Killed(reason)

    def abort_cs(self, t: Thread) -> None:
        t.feed(("t",))

    # ------------------------------------------------------------ scheduling
    def switch_out(self, t: Thread, event: int) -> None:
        cpu = t.k["cpu"]
        self.cpus[cpu] = None
        t.k["cpu"] = None
        t.k["last_cpu"] = cpu
        if t.k["rseq"] is not None:
            t.k["events"] |= event
            t.k["notify"] = True
        self.variant.on_switch(self, t, False)

    def schedule_in(self, t: Thread, cpu: int) -> None:
        last = t.k["last_cpu"]
        t.k["cpu"] = cpu
        self.cpus[cpu] = t.tid
        if last is not None and last != cpu:
            t.k["events"] |= EV_MIGRATE
            if t.k["rseq"] is not None:
                t.k["notify"] = True
        self._assign_cid(t)
        self.variant.on_switch(self, t, True)
        self.return_to_user(t)

    def _assign_cid(self, t: Thread) -> None:
        # mm_cid: a compact id among the running threads of the process,
        # kept when still free (the kernel's per-mm concurrency id).
        used = {o.k["mm_cid"] for o in self.threads if o is not t and o.k["cpu"] is not None}
        cid = t.k["mm_cid"]
        if cid is None or cid in used:
            cid = next(i for i in range(len(self.threads) + 1) if i not in used)
            t.k["mm_cid"] = cid

    def return_to_user(self, t: Thread, from_syscall: bool = False) -> None:
        if t.k["notify"]:
            t.k["notify"] = False
            self.variant.resume(self, t, from_syscall)
            t.k["events"] = 0

    # ------------------------------------------------------------ state
    def snapshot(self) -> tuple:
        return (
            dict(self.memory),
            tuple((t.k.copy(), t.history) for t in self.threads),
            tuple(self.cpus),
            dict(self.ghost),
            tuple(self.used),
            self.regions,
            self.killed,
            self.steps,
            self.membarrier_registered,
        )

    def restore(self, snap: tuple) -> None:
        mem, threads, cpus, ghost, used, regions, killed, steps, mb = snap
        self.memory = dict(mem)
        for t, (k, history) in zip(self.threads, threads):
            t.k = k.copy()
            if t.history is not history:
                t.replay(history)
        self.cpus = list(cpus)
        self.ghost = dict(ghost)
        self.used = list(used)
        self.regions = regions
        self.killed = killed
        self.steps = steps
        self.membarrier_registered = mb
        self.kernel_writes = []

    def key(self) -> tuple:
        return (
            frozenset(self.memory.items()),
            tuple((tuple(t.k.values()), t.frame_key() if t.alive else ()) for t in self.threads),
            tuple(self.cpus),
            frozenset(self.ghost.items()),
            tuple(self.used),
            self.killed,
        )

    @property
    def finished(self) -> bool:
        return all(not t.alive or not t.stack for t in self.threads)

    # ------------------------------------------------------------ moves
    def choices(self, bounds: tuple[int, int, int], signals: bool) -> list[tuple]:
        """Every move the scheduler (and the program's own choices) can make."""
        if self.killed is not None:
            return []
        out: list[tuple] = []
        waiting = [t.tid for t in self.threads if t.alive and t.stack and t.k["cpu"] is None]
        if self.reduce:
            for cpu, tid in enumerate(self.cpus):
                if tid is None:
                    continue
                t = self.thread(tid)
                step = t.next_step
                if step is not None and t.invisible(step):
                    return self._moves_of(t, cpu, step, waiting, bounds, signals)
        for cpu, tid in enumerate(self.cpus):
            if tid is None:
                for w in waiting:
                    out.append(("schedule", cpu, w))
                continue
            t = self.thread(tid)
            step = t.next_step
            if isinstance(step, Choose):
                for i in range(step.n):
                    out.append(("choose", tid, i))
            elif step is not None:
                out.append(("step", tid))
        preempt_ok = self.used[0] < bounds[0]
        migrate_ok = self.used[1] < bounds[1]
        signal_ok = signals and self.used[2] < bounds[2]
        for cpu, tid in enumerate(self.cpus):
            if tid is None or not self.thread(tid).stack:
                continue
            if preempt_ok:
                if self._preempt_matters(self.thread(tid)):
                    out.append(("preempt", cpu, None))
                for w in waiting:
                    out.append(("preempt", cpu, w))
            if migrate_ok:
                for other in range(self.ncpus):
                    if other != cpu:
                        out.append(("migrate", tid, other))
            if signal_ok:
                out.append(("signal", tid))
        return out

    def _preempt_matters(self, t: Thread) -> bool:
        """A preemption by another process (the thread comes straight back
        on the same CPU) is only observable inside a critical section; the
        variant may say otherwise (slice grants, tamper checks)."""
        if not self.reduce:
            return True
        step = t.next_step
        return (step is not None and step.ip is not None) or self.variant.preempt_always_observable

    def _moves_of(self, t, cpu, step, waiting, bounds, signals) -> list[tuple]:
        """The persistent set at an invisible step of ``t``: the step itself
        and the kernel events aimed at ``t``, which do not commute with it."""
        if isinstance(step, Choose):
            out = [("choose", t.tid, i) for i in range(step.n)]
        else:
            out = [("step", t.tid)]
        if self.used[0] < bounds[0]:
            if self._preempt_matters(t):
                out.append(("preempt", cpu, None))
            out.extend(("preempt", cpu, w) for w in waiting)
        if self.used[1] < bounds[1]:
            out.extend(("migrate", t.tid, c) for c in range(self.ncpus) if c != cpu)
        if signals and self.used[2] < bounds[2]:
            out.append(("signal", t.tid))
        return out

    def apply(self, move: tuple) -> tuple | None:
        """Make one move.  Returns ``(thread, step, result)`` when a user step
        ran, else None.  A SIGSEGV ends the process (``self.killed``)."""
        self.kernel_writes = []
        try:
            return self._apply(move)
        except Killed:
            return None

    def _apply(self, move: tuple):
        kind = move[0]
        if kind == "step":
            return self.execute(self.thread(move[1]))
        if kind == "choose":
            t = self.thread(move[1])
            step = t.next_step
            self.steps += 1
            if self.log is not None:
                self.say(self._step_line(t, step, move[2]))
            t.feed(("s", move[2]))
            self._after_user_step(t)
            return (t, step, move[2])
        if kind == "schedule":
            _, cpu, tid = move
            t = self.thread(tid)
            self.say(f"        sched: {t.name} runs on cpu{cpu}")
            self.schedule_in(t, cpu)
            return None
        if kind == "preempt":
            _, cpu, tid = move
            self.used[0] += 1
            t = self.thread(self.cpus[cpu])
            if self.variant.slice_intercepts_preemption(self, t, tid):
                return None
            incoming = self.thread(tid) if tid is not None else t
            other = "another task" if tid is None else incoming.name
            self.say(f"        sched: preempt {t.name} on cpu{cpu} ({other} runs)")
            self.switch_out(t, EV_PREEMPT)
            self.schedule_in(incoming, cpu)
            return None
        if kind == "migrate":
            _, tid, cpu = move
            self.used[1] += 1
            t = self.thread(tid)
            old = t.k["cpu"]
            self.say(f"        sched: migrate {t.name} cpu{old} -> cpu{cpu}")
            occupant = self.cpus[cpu]
            if occupant is not None:
                self.switch_out(self.thread(occupant), EV_PREEMPT)
            self.switch_out(t, EV_PREEMPT)
            self.schedule_in(t, cpu)
            return None
        if kind == "signal":
            t = self.thread(move[1])
            self.used[2] += 1
            self.say(f"        kernel: deliver a signal to {t.name}")
            t.k["events"] |= EV_SIGNAL
            if t.k["rseq"] is not None:
                t.k["notify"] = True
            self.return_to_user(t)
            if t.handler is not None:
                t.feed(("h",))
            return None
        raise ValueError(f"unknown move {move!r}")

    # ------------------------------------------------------------ user steps
    def _user_fault(self, t: Thread, addr: int, write: bool) -> None:
        what = "write to" if write else "read of"
        self.kill(t, f"{what} unmapped or protected {self.sym(addr)} ({addr:#x})")

    def execute(self, t: Thread):
        step = t.next_step
        self.steps += 1
        cls = type(step)
        if cls is Load:
            if not self.accessible(step.addr, step.size, False):
                self._user_fault(t, step.addr, False)
            result = self.read(step.addr)
        elif cls is Store:
            if not self.accessible(step.addr, step.size, True):
                self._user_fault(t, step.addr, True)
            self.memory[step.addr] = step.value
            result = None
        elif cls is Cas:
            if not self.accessible(step.addr, step.size, True):
                self._user_fault(t, step.addr, True)
            result = self.read(step.addr)
            if result == step.expected:
                self.memory[step.addr] = step.new
        elif cls is Mark:
            result = None
        elif cls is Syscall:
            if self.log is not None:
                self.say(self._step_line(t, step, "..."))
            return self._syscall(t, step)
        else:
            raise TypeError(f"{t.name} yielded {step!r}, not a model step")
        if self.log is not None:
            self.say(self._step_line(t, step, result))
        t.feed(("s", result))
        self._after_user_step(t)
        return (t, step, result)

    def _after_user_step(self, t: Thread) -> None:
        if not t.stack:
            t.k["status"] = "exit"
            cpu = t.k["cpu"]
            if cpu is not None:
                self.cpus[cpu] = None
                t.k["cpu"] = None
            self.variant.on_exit(self, t)
            self.say(f"        kernel: {t.name} exits")
            return
        self.variant.after_user_step(self, t)

    def _syscall(self, t: Thread, step: Syscall):
        self.variant.syscall_entry(self, t, step)
        result, leaves_cpu = self.variant.syscall(self, t, step)
        if self.log is not None:
            self.say(f"        = {_abi.errno_name(result) if isinstance(result, int) else result}")
        t.feed(("s", result))
        if leaves_cpu and t.k["cpu"] is not None:
            self.switch_out(t, EV_PREEMPT)
            self.variant.after_yield(self, t)
        elif t.k["cpu"] is not None:
            self.return_to_user(t, from_syscall=True)
        if t.k["status"] == "run":
            self._after_user_step(t)
        return (t, step, result)

    def _step_line(self, t: Thread, step, result) -> str:
        cpu = t.k["cpu"]
        where = f"{t.name}@cpu{cpu}" if cpu is not None else t.name
        ip = f"[ip {step.ip:#x}]" if step.ip is not None else ""
        cls = type(step)
        if cls is Load:
            text = f"load  {self.sym(step.addr)} -> {self.value(result)}"
        elif cls is Store:
            text = f"store {self.sym(step.addr)} = {self.value(step.value)}"
            if step.commit:
                text += "   (commit)"
        elif cls is Cas:
            ok = "ok" if result == step.expected else f"failed, found {self.value(result)}"
            text = (
                f"cas   {self.sym(step.addr)} {self.value(step.expected)} "
                f"-> {self.value(step.new)}   ({ok})"
            )
        elif cls is Syscall:
            args = ", ".join(
                hex(a) if isinstance(a, int) and a > 4096 else str(a) for a in step.args
            )
            text = f"syscall {step.name}({args})"
        elif cls is Mark:
            text = f"mark  {step.label}" + (f" {step.arg}" if step.arg is not None else "")
        elif cls is Choose:
            text = f"choose {step.why or 'a branch'} -> {result}"
        else:
            text = repr(step)
        return f"step {self.steps:<4} {where:<10} {text} {ip}".rstrip()
