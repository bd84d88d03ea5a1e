"""The model machine: memory, CPUs, threads, the scheduler's moves, and the
generic half of the kernel (return to user space, faults, kills).  What is
specific to an ABI design lives in the variant (``variants``).

A machine's whole state is plain data (dicts of ints, tuples) plus each
thread's local state in its program's automaton (``ProgramTable``): the
generators run once per new edge, not once per state.  ``snapshot()`` and
``restore()`` save and load that data; ``key()`` packs memory, kernel state
and the local states into bytes, so equivalent states reached by different
schedules are recognised.
"""

from __future__ import annotations

import marshal
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


class ProgramTable:
    """One thread's program as an explicit automaton, built lazily.

    A local state (an int) stands for one generator stack, identified by its
    frames' code positions and locals (``frame_key``): the same position
    with the same locals behaves the same from there on, which is the
    premise of the explorer's state hashing.  ``steps[s]`` is the step the
    program yields in state ``s`` (None: finished) and ``edges[s]`` maps an
    event (``("s", result)``, ``("t",)`` abort, ``("h",)`` signal handler)
    to the next state.  An edge is computed once, by running a generator
    (the live one when it sits in ``s``, else a replay of the history that
    first reached ``s``); the explorer then moves a thread by a dict lookup
    and saves it as one int, never replaying generators per state.
    """

    __slots__ = (
        "program", "ctx", "handler", "steps", "edges", "paths", "index", "live", "live_state",
        "done",
    )

    def __init__(self, program: Callable, ctx: Context | None, handler: Callable | None):
        self.program = program
        self.ctx = ctx
        self.handler = handler
        self.steps: list = []
        self.edges: list[dict] = []
        self.paths: list[tuple] = []  # the history that first reached each state
        self.index: dict[tuple, int] = {}
        self.done = -1  # a finished state, once one is known
        stack: list[list] = []
        self._push(stack, program(ctx))
        self.live = stack
        self.live_state = self._intern(stack, ())

    # -- generators
    @staticmethod
    def _push(stack: list, gen) -> None:
        try:
            step = next(gen)
        except StopIteration:
            return
        stack.append([gen, step])

    def _advance(self, stack: list, event: tuple) -> None:
        kind = event[0]
        if kind == "h":
            self._push(stack, self.handler(self.ctx))
            return
        frame = stack[-1]
        try:
            if kind == "s":
                frame[1] = frame[0].send(event[1])
            else:  # "t": abort
                frame[1] = frame[0].throw(Abort())
        except StopIteration:
            stack.pop()

    def _replay(self, path: tuple) -> list:
        stack: list[list] = []
        self._push(stack, self.program(self.ctx))
        for event in path:
            self._advance(stack, event)
        return stack

    def _intern(self, stack: list, path: tuple) -> int:
        key = frame_key(stack)
        state = self.index.get(key)
        if state is None:
            state = len(self.steps)
            self.index[key] = state
            self.steps.append(stack[-1][1] if stack else None)
            self.edges.append({})
            self.paths.append(path)
        return state

    def done_state(self) -> int:
        """A state where the program has finished (or 0): where a thread
        that no longer runs is put back when a state is restored."""
        if self.done < 0 or self.steps[self.done] is not None:
            self.done = next((s for s, step in enumerate(self.steps) if step is None), -1)
        return max(self.done, 0)

    def edge(self, state: int, event: tuple) -> int:
        nxt = self.edges[state].get(event)
        if nxt is None:
            if self.live_state == state:
                stack = self.live
            else:
                stack = self._replay(self.paths[state])
            try:
                self._advance(stack, event)
            except BaseException:
                # the program raised: its live generator is spent
                self.live_state = -1
                raise
            nxt = self._intern(stack, self.paths[state] + (event,))
            self.edges[state][event] = nxt
            self.live, self.live_state = stack, nxt
        return nxt


def frame_key(stack: list) -> tuple:
    """A generator stack's identity: code, position and locals of every frame
    (through ``yield from``); values that are not plain data count by id."""
    out = []
    for gen, _ in stack:
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


def _kernel_fields() -> dict[str, Any]:
    """A new thread's kernel-side state: only marshallable values."""
    return {
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


_K_NAMES = tuple(_kernel_fields())
_K_FIELDS = len(_K_NAMES)


class Thread:
    __slots__ = ("tid", "name", "program", "ctx", "k", "table", "state", "handler", "private",
                 "_invisible")

    def __init__(self, tid: int, name: str, program: Callable | None, ctx: Context | None):
        self.tid = tid
        self.name = name
        self.program = program
        self.ctx = ctx
        self.handler: Callable | None = None
        # kernel-side state: only marshallable values, saved in every state
        self.k: dict[str, Any] = _kernel_fields()
        self.table: ProgramTable | None = None
        self.state = 0  # the program's local state in ``table``
        self.private: tuple = ()  # (start, end) ranges only this thread touches
        self._invisible: dict[int, bool] = {}  # local state -> invisible(its step)

    # -- program side
    def start(self) -> None:
        self.table = None
        self.state = 0
        self._invisible = {}
        if self.program is not None:
            self.table = ProgramTable(self.program, self.ctx, self.handler)
            self.state = self.table.live_state

    def feed(self, event: tuple) -> None:
        """Apply one event (a step's result, an abort, a signal handler)."""
        self.state = self.table.edge(self.state, event)

    @property
    def stack(self) -> tuple:
        """Non-empty while the program has a step to run."""
        if self.table is None or self.table.steps[self.state] is None:
            return ()
        return (self.state,)

    @property
    def next_step(self):
        return None if self.table is None else self.table.steps[self.state]

    def ip(self) -> int:
        step = self.next_step
        if step is None or step.ip is None:
            return OUTSIDE_IP
        return step.ip

    def invisible(self, step) -> bool:
        """A step that only this thread can observe: it touches only this
        thread's own regions (``private``: its ``T<n>.`` variables, never
        the rseq area, which the kernel rewrites), or is a ``Choose`` or a
        system call confined to the thread.  See ``Machine.choices`` for
        when the explorer may run it alone."""
        cls = type(step)
        if cls is Load or cls is Store:
            addr = step.addr
            return any(start <= addr < end for start, end in self.private)
        if cls is Choose:
            return True
        if cls is Syscall:
            return step.name in _PRIVATE_SYSCALLS
        return False

    def invisible_now(self) -> bool:
        """``invisible`` of the next step, kept per local state (the step
        and ``private`` do not change once the thread runs)."""
        found = self._invisible.get(self.state)
        if found is None:
            found = self._invisible[self.state] = self.invisible(self.table.steps[self.state])
        return found

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
        self.reduced = False  # whether the last choices() returned a reduced set
        self.reduction_unsound = False  # set by a step the reduction does not cover
        self.kernel_writes: list[tuple] = []  # (addr, size, field, tid) since last check
        self._next_data = DATA_BASE
        self._next_text = TEXT_BASE
        self._next_rodata = RODATA_BASE
        self.sections: dict[str, CriticalSection] = {}
        self._layout: tuple = ()
        self._access: dict[tuple, bool] = {}
        self._cs_layout: tuple | None = None
        self._cs_cache: dict[tuple, tuple] = {}
        # the variant's hooks, None where it keeps the base class's no-op
        self._hook_on_switch = self._hook("on_switch")
        self._hook_on_exit = self._hook("on_exit")
        self._hook_after_user_step = self._hook("after_user_step")
        self._hook_after_yield = self._hook("after_yield")
        self._hook_slice_intercepts = self._hook("slice_intercepts_preemption")
        # interned parts of a state (see key())
        self._addr_sets: list[tuple] = []
        self._addr_index: dict[tuple, int] = {}
        self._mem_obj: dict | None = None
        self._mem_addrs = -1
        self._mem_size = -1
        self._decoded_key = b""
        self._decoded: tuple = ()
        self._layouts: list[tuple] = []
        self._layout_index: dict[tuple, int] = {}
        self._layout_seen: tuple | None = None
        self._layout_no = -1
        self._shapes: list[tuple] = [_K_NAMES]
        self._shape_index: dict[tuple, int] = {_K_NAMES: 0}
        # a thread's kernel state (shape, values) as one small int: few
        # distinct ones exist, and a key then holds one int per thread
        self._kstates: list[tuple] = []
        self._kstate_index: dict[tuple, int] = {}

    def _hook(self, name: str):
        hook = getattr(self.variant, name)
        return None if getattr(hook, "noop", False) else hook

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
        # memoised per layout: the regions change rarely (map, unmap,
        # mprotect), the checks run on every step
        if self.regions is not self._layout:
            self._layout = self.regions
            self._access = {}
        query = (addr, size, write)
        ok = self._access.get(query)
        if ok is None:
            ok = self._access[query] = self._accessible(addr, size, write)
        return ok

    def _accessible(self, addr: int, size: int, write: bool) -> bool:
        r = self.region_of(addr)
        if r is None or addr + size > r.end:
            # an access may span adjacent regions
            if r is None:
                return False
            return self._accessible(r.end, addr + size - r.end, write) and (
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

    def constant_cs(self, ptr: int, signature: int) -> dict | None:
        """A critical-section descriptor kept by ``keep_constant_cs``, if
        the memory layout is the same and nobody wrote over it since."""
        if self.regions is not self._cs_layout:
            return None
        found = self._cs_cache.get((ptr, signature))
        if found is None:
            return None
        desc, addrs = found
        memory = self.memory
        for addr in addrs:
            if addr in memory:
                return None
        return desc

    def keep_constant_cs(self, ptr: int, signature: int, desc: dict, words: tuple) -> None:
        """Keep a checked descriptor whose words (``words``: the addresses
        read) lie in regions that neither user space nor the kernel can
        write, and hold no written value."""
        if self.regions is not self._cs_layout:
            self._cs_layout = self.regions
            self._cs_cache = {}
        for addr in words:
            region = self.region_of(addr)
            if addr in self.memory or region is None or "w" in region.perm:
                return
        self._cs_cache[(ptr, signature)] = (desc, words)

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
        if self._hook_on_switch is not None:
            self._hook_on_switch(self, t, False)

    def schedule_in(self, t: Thread, cpu: int) -> None:
        last = t.k["last_cpu"]
        t.k["cpu"] = cpu
        self.cpus[cpu] = t.tid
        if last is not None and last != cpu:
            t.k["events"] |= EV_MIGRATE
            if t.k["rseq"] is not None:
                t.k["notify"] = True
        self._assign_cid(t)
        if self._hook_on_switch is not None:
            self._hook_on_switch(self, t, True)
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
    #
    # A state is one bytes object, the marshalled tuple
    #   (address set, memory values, threads, cpus, ghost items, budgets used,
    #    killed, memory layout, membarrier registered)
    # with the threads as a flat tuple of (kernel state, local state) ints,
    # the kernel state naming an interned (field names, values) pair.
    # It is both the visited set's key and the snapshot the search restores
    # from, so a stored state costs its bytes once.  The address set, the
    # kernel states and the layout are small ints naming interned tuples:
    # few distinct ones exist.  A thread that is not running saves its local state as
    # -1 (it no longer matters): equal otherwise, such states are the same.

    def snapshot(self) -> bytes:
        return self.key()

    def restore(self, snap: bytes) -> None:
        if snap != self._decoded_key:
            # decode once; a state is restored once per move tried from it
            addrs, values, threads, cpus, ghost, used, killed, layout, mb = marshal.loads(snap)
            shapes = self._shapes
            kstates = self._kstates
            ks = []
            states = []
            for i, t in enumerate(self.threads):
                shape, kv = kstates[threads[2 * i]]
                state = threads[2 * i + 1]
                ks.append(dict(zip(shapes[shape], kv)))
                if state < 0:
                    state = t.table.done_state() if t.table is not None else 0
                states.append(state)
            self._decoded_key = snap
            self._decoded = (dict(zip(self._addr_sets[addrs], values)), addrs, ks, states,
                             cpus, dict(ghost), used, killed, self._layouts[layout], mb)
        memory, addrs, ks, states, cpus, ghost, used, killed, regions, mb = self._decoded
        self.memory = memory = memory.copy()
        self._mem_obj = memory
        self._mem_addrs = addrs
        self._mem_size = len(memory)
        for t, k, state in zip(self.threads, ks, states):
            t.k = k.copy()
            t.state = state
        self.cpus = list(cpus)
        self.ghost = ghost.copy()
        self.used = list(used)
        self.regions = regions
        self.killed = killed
        self.membarrier_registered = mb
        self.kernel_writes = []

    def _intern(self, table: dict, items: list, value: tuple) -> int:
        index = table.get(value)
        if index is None:
            index = table[value] = len(items)
            items.append(value)
        return index

    def key(self) -> bytes:
        """The state's identity for the visited set, as compact bytes:
        memory, kernel thread state, each program's local state, the
        scenario's ghost data, the budgets used and the memory layout."""
        memory = self.memory
        if memory is not self._mem_obj or len(memory) != self._mem_size:
            # a new address was written (none is ever removed) or the dict
            # was replaced: put it in address order, so that its values
            # line up with its interned address set
            memory = self.memory = dict(sorted(memory.items()))
            self._mem_obj = memory
            self._mem_size = len(memory)
            self._mem_addrs = self._intern(self._addr_index, self._addr_sets, tuple(memory))
        if self.regions is not self._layout_seen:
            self._layout_seen = self.regions
            self._layout_no = self._intern(self._layout_index, self._layouts, self.regions)
        threads = []
        kindex = self._kstate_index
        for t in self.threads:
            k = t.k
            if len(k) == _K_FIELDS:
                shape = 0
            else:
                shape = self._intern(self._shape_index, self._shapes, tuple(k))
            kv = (shape, tuple(k.values()))
            kid = kindex.get(kv)
            if kid is None:
                kid = self._intern(kindex, self._kstates, kv)
            threads.append(kid)
            threads.append(t.state if k["status"] == "run" else -1)
        ghost = self.ghost
        return marshal.dumps((
            self._mem_addrs,
            tuple(memory.values()),
            tuple(threads),
            tuple(self.cpus),
            tuple(sorted(ghost.items(), key=repr)) if ghost else (),
            tuple(self.used),
            self.killed,
            self._layout_no,
            self.membarrier_registered,
        ), 2)

    @property
    def finished(self) -> bool:
        for t in self.threads:
            table = t.table
            if table is not None and t.k["status"] == "run" and table.steps[t.state] is not None:
                return False
        return True

    # ------------------------------------------------------------ moves
    def choices(self, bounds: tuple[int, int, int], signals: bool) -> list[tuple]:
        """Every move the scheduler (and the program's own choices) can make."""
        if self.killed is not None:
            return []
        threads = self.threads
        cpus = self.cpus
        used = self.used
        waiting = []
        for t in threads:
            k = t.k
            if k["cpu"] is None and k["status"] == "run":
                table = t.table
                if table is not None and table.steps[t.state] is not None:
                    waiting.append(t.tid)
        self.reduced = False
        if self.reduce and used[0] >= bounds[0] and used[1] >= bounds[1]:
            # Partial-order reduction: an invisible step runs alone, with the
            # events aimed at its thread.  Only once the preemption and
            # migration budgets are spent: before that, another thread could
            # leave its CPU and then preempt this one, or migrate onto its
            # CPU, before the step (docs/model.md, "Why the reduction is sound").
            for cpu, tid in enumerate(cpus):
                if tid is None:
                    continue
                t = threads[tid - 1]
                if t.table is None:
                    continue
                step = t.table.steps[t.state]
                if step is not None and t.invisible_now():
                    self.reduced = True
                    return self._moves_of(t, cpu, step, waiting, bounds, signals)
        out: list[tuple] = []
        running = []  # (cpu, thread) with a step to run
        for cpu, tid in enumerate(cpus):
            if tid is None:
                for w in waiting:
                    out.append(("schedule", cpu, w))
                continue
            t = threads[tid - 1]
            step = t.table.steps[t.state] if t.table is not None else None
            if step is None:
                continue
            running.append((cpu, tid, step))
            if type(step) is Choose:
                for i in range(step.n):
                    out.append(("choose", tid, i))
            else:
                out.append(("step", tid))
        preempt_ok = used[0] < bounds[0]
        migrate_ok = used[1] < bounds[1]
        signal_ok = signals and used[2] < bounds[2]
        if not (preempt_ok or migrate_ok or signal_ok):
            return out
        always = not self.reduce or self.variant.preempt_always_observable
        for cpu, tid, step in running:
            if preempt_ok:
                if always or step.ip is not None:
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
        """The persistent set at an invisible step of ``t`` once no
        preemption or migration is left: the step itself and a signal to
        ``t``, the one event left that does not commute with it."""
        if isinstance(step, Choose):
            out = [("choose", t.tid, i) for i in range(step.n)]
        else:
            out = [("step", t.tid)]
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
            intercepts = self._hook_slice_intercepts
            if intercepts is not None and intercepts(self, t, tid):
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
            if self._hook_on_exit is not None:
                self._hook_on_exit(self, t)
            self.say(f"        kernel: {t.name} exits")
            return
        if self._hook_after_user_step is not None:
            self._hook_after_user_step(self, t)

    def _syscall(self, t: Thread, step: Syscall):
        if step.name == "membarrier":
            # an IPI acts on other threads from this thread's step: the
            # reduction's independence argument does not cover it
            self.reduction_unsound = True
        self.variant.syscall_entry(self, t, step)
        result, leaves_cpu = self.variant.syscall(self, t, step)
        if self.log is not None:
            self.say(f"        = {_abi.errno_name(result) if isinstance(result, int) else result}")
        t.feed(("s", result))
        if leaves_cpu and t.k["cpu"] is not None:
            self.switch_out(t, EV_PREEMPT)
            if self._hook_after_yield is not None:
                self._hook_after_yield(self, t)
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
