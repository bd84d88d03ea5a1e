"""SPIN as a second engine: the scenario exported to Promela and checked by
``pan``.

The export is generated from the definitions the Python explorer runs, not
written twice:

- each thread's program is its ``ProgramTable`` (the automaton the explorer
  builds from the generator): one Promela branch per known edge; a load
  whose value has no known edge yet sets ``incomplete``, SPIN's trail to it
  is replayed through the Python machine (which computes the edge), and the
  model is generated again, until SPIN finds no incomplete path;
- the machine (CPUs, a thread's CPU and last CPU, event mask, notify flag,
  the rseq area's ``cpu_id_start``, ``cpu_id`` and ``rseq_cs``, the critical
  sections' descriptors, abort on preemption, migration and signal inside a
  section, the lazy clear of ``rseq_cs``, the kill of a thread that makes a
  system call inside a section where the variant says so) is the Python
  machine's ``choices``/``apply`` written once in Promela below, with the
  variant's offsets filled in; the variant's own rules (sched_state, the
  slice extension and optimised IDs, seed 000's registration) are Promela
  written in ``_spin_variants``, called through hooks;
- the properties: SPIN prints every reachable final state (the shared
  memory, the budgets used, the ghost state, whether the process was
  killed or a check_step judgment failed) and the scenario's own
  ``check_final`` judges each; a violating final state becomes an
  assertion, and SPIN's trail to it is replayed by the Python engine, which
  prints the usual trace;
- what stays Python (learned functions): ``check_step`` and the rseq
  system call are Python functions of the machine.  Each call the Python
  machine makes (in the seed search and in every trail replay) runs with
  the machine's memory, ghost state and threads' kernel state wrapped in
  recordings, so the export knows exactly which inputs it read (in order,
  with their values) and its outcome; the calls of one context form a
  decision tree, exported as nested ``if``s whose unknown branches set
  ``incomplete`` like a program's missing edge.  ``check_step``'s context is
  its move when the check reads its ``info`` argument (a user step: the
  program edge, which fixes the thread, the step and its result; every
  scheduler move: one context), else one context for every move; its
  outcome is a verdict and, when it touched the ghost state, the new ghost
  state, interned as a number (``ghost``).  A failed judgment sets
  ``stepbad`` (sticky, so the final states stay those of the unchecked
  machine); the verdict is violated when a final state carries one, and the
  same pan run again with ``RSEQ_STEPSTOP`` (paths end at the first) gives
  the trail.  The rseq system call's
  context is the thread's program state (its arguments are fixed there);
  its outcome is the result, the memory it writes (``rseq_cs`` cleared at
  registration, the IDs reset at unregistration) and the thread's
  registration (``reg[t]``, interned; 0: none), which the Promela kernel
  tests where the Python one tests ``k["rseq"]``.  Learned, not rewritten:
  the EBUSY/EINVAL/EPERM/EFAULT rules stay the variant's one Python text,
  and a variant that changes them needs nothing here.

Bounds (preemptions, migrations, signals) are ``#define`` parameters; the
thread count is the scenario's (``--threads`` where the scenario scales).
What cannot be exported yet raises ``Unsupported`` with the reason:
variants without Promela rules (ktls-2020), system calls
other than the thread-private ones and rseq, programs that read
``node_id``/``mm_cid`` (not modelled in Promela), learned functions that
read or write state the Promela machine lacks (``m.kernel_writes`` but
under size-flag-2020, the
slice or mm_cid kernel state, the memory map), or whose outcome depends on
something untracked (two outcomes for the same inputs).
"""

from __future__ import annotations

import dis
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from ._learn import SYSCALL_RESULTS as _SYSCALL_RESULTS  # getcpu: the CPU
from ._learn import learn_programs
from ._machine import EV_MIGRATE, EV_PREEMPT, EV_SIGNAL, OUTSIDE_IP, Killed, Machine
from ._program import Cas, Choose, Load, Mark, Store, Syscall
from ._spin_variants import VARIANT_RULES, rules_for

SUPPORTED_VARIANTS = ("linux-4.18", "linux-6.3", "freebsd-2021", *VARIANT_RULES)
# system calls whose effect is learned from the variant's Python code
LEARNED_SYSCALLS = ("rseq",)
MAX_ROUNDS = 60  # model completion rounds before giving up
TRAILS_PER_ROUND = 20
# the unreduced Python search that seeds the automata (list-pop-rseq at its default
# bounds needs about 200,000 states, 12 s; seeding by random runs left it minutes of rounds)
SEED_STATES = 300_000


class Unsupported(Exception):
    """The scenario (or variant) uses something the Promela export lacks."""


class SpinMissing(Exception):
    """spin or a C compiler is not installed."""


class PanOutOfMemory(RuntimeError):
    """pan reached its memory limit: the search did not complete."""


def tools() -> tuple[str, str]:
    """Paths of spin and the C compiler, or SpinMissing saying which is absent."""
    spin = shutil.which("spin")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if spin is None:
        raise SpinMissing(
            "SPIN is not installed: install the Debian package 'spin' "
            "(apt-get install spin) or use --engine python"
        )
    if cc is None:
        raise SpinMissing("no C compiler (cc or gcc) to build SPIN's pan verifier: install gcc")
    return spin, cc


def supported(scenario, variant: str) -> str | None:
    """None when the scenario exports to Promela under ``variant``, else why not."""
    if variant not in SUPPORTED_VARIANTS:
        return f"variant {variant} is not in the Promela export ({', '.join(SUPPORTED_VARIANTS)})"
    if scenario.check_final is None and scenario.check_step is None and not scenario.allows_kill:
        return "it has no property"
    if scenario.variant_options:
        rules = VARIANT_RULES.get(variant)
        known = rules.options if rules is not None else ()
        unknown = sorted(set(scenario.variant_options) - set(known))
        if unknown:
            return f"it runs {variant} with options the export lacks: {', '.join(unknown)}"
    return None


# ---------------------------------------------------------------- learned functions
#
# A check_step property and the rseq system call are Python functions of
# the machine.  They stay in Python: each call the Python machine makes is
# recorded with the inputs it read (in the order read) and its outcome, and
# the recordings of one context form a decision tree: a node tests one
# input, a leaf is the outcome.  A deterministic function reads its next
# input according to the values already read, so the recordings of one
# context never disagree; the tree is exported as nested Promela ``if``s
# whose unknown branches set ``incomplete`` (learned in the next round,
# like a program's missing edge).

_EMPTY = object()  # a tree node not yet reached by any recording


class _Tree:
    """A learned function of the machine, as a decision tree."""

    __slots__ = ("input", "branches", "leaf")

    def __init__(self):
        self.input = None
        self.branches: dict = {}
        self.leaf = _EMPTY

    def add(self, reads: dict, leaf, what: str) -> None:
        node = self
        for name, value in reads.items():
            if node.input is None:
                if node.leaf is not _EMPTY:
                    raise Unsupported(f"{what} read {name} after reading nothing before "
                                      "with the same inputs: it depends on something the "
                                      "export does not track")
                node.input = name
            elif node.input != name:
                raise Unsupported(f"{what} read {name} where it read {node.input} before "
                                  "with the same inputs: it depends on something the export "
                                  "does not track")
            node = node.branches.setdefault(value, _Tree())
        if node.input is not None or (node.leaf is not _EMPTY and node.leaf != leaf):
            raise Unsupported(f"{what} gave two outcomes for the same inputs: it depends on "
                              "something the export does not track")
        node.leaf = leaf

    def lookup(self, value_of):
        """The outcome learned for the inputs ``value_of(input)`` gives, or
        _EMPTY where the tree does not know them yet."""
        node = self
        while node.input is not None:
            node = node.branches.get(value_of(node.input))
            if node is None:
                return _EMPTY
        return node.leaf

    @property
    def constant(self):
        """The outcome when the function reads nothing, else _EMPTY."""
        return self.leaf if self.input is None else _EMPTY

    def code(self, test, leaf_code) -> str:
        """Promela: ``test(input, value)`` is a condition, ``leaf_code(leaf)``
        the statements of an outcome."""
        if self.input is None:
            return leaf_code(self.leaf)
        alts = [f":: {test(self.input, value)} -> {child.code(test, leaf_code)}"
                for value, child in self.branches.items()]
        return "if " + " ".join(alts) + " :: else -> incomplete = 1 fi"


class _Recording(dict):
    """A machine dict (memory, the ghost state, a thread's kernel state)
    while a learned function runs: it notes the first read of every entry
    (with the value it had) and every write."""

    def __init__(self, data: dict, reads: dict, name, unknown=None):
        super().__init__(data)
        self._reads = reads
        self._name = name  # entry -> input name
        self._unknown = unknown  # entry -> value of an absent entry
        self.writes: dict = {}

    def _note(self, key) -> None:
        if key in self.writes:
            return
        name = self._name(key)
        if name is not None and name not in self._reads:
            value = dict.get(self, key, _EMPTY)
            if value is _EMPTY:
                value = self._unknown(key) if self._unknown else None
            self._reads[name] = value

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)

    def __setitem__(self, key, value):
        self.writes[key] = value
        super().__setitem__(key, value)

    def _everything(self, *args, **kwargs):
        raise Unsupported(f"a learned function reads every entry of {self._name(None)}")

    __iter__ = keys = values = items = __len__ = pop = setdefault = __delitem__ = _everything
    popitem = update = clear = copy = _everything

    def plain(self) -> dict:
        return dict(dict.items(self))


class _WholeGhost(_Recording):
    """The ghost state: any use of it reads it whole (its interned number)."""

    def __init__(self, data: dict, reads: dict, number: int):
        super().__init__(data, reads, lambda key: ("ghost",))
        self._number = number
        self.touched = False

    def _note(self, key) -> None:
        self.touched = True
        self._reads.setdefault(("ghost",), self._number)

    def _whole(self, method):
        def run(*args, **kwargs):
            self._note(None)
            return getattr(dict, method)(self, *args, **kwargs)
        return run

    def __getattribute__(self, attr):
        if attr in ("items", "keys", "values", "pop", "setdefault", "popitem", "update",
                    "clear", "copy"):
            return dict.__getattribute__(self, "_whole")(attr)
        return dict.__getattribute__(self, attr)

    def __iter__(self):
        self._note(None)
        return dict.__iter__(self)

    def __len__(self):
        self._note(None)
        return dict.__len__(self)

    def __delitem__(self, key):
        self._note(None)
        self.writes[key] = None
        dict.__delitem__(self, key)

    def __setitem__(self, key, value):
        self._note(None)
        super().__setitem__(key, value)


class _KernelWrites(list):
    """``m.kernel_writes`` while check_step runs: reading it is one input,
    the set of the move's kernel writes (addr, size, field, tid), which the
    Promela machine keeps as a bit mask (``kw``) where the variant's rules
    track their writes (``KernelRules.kernel_write``).  A check whose
    verdict depended on their order or repetition would give two outcomes
    for one input, which the tree refuses."""

    def __init__(self, writes, reads: dict, model: Model):
        super().__init__(writes)
        self._reads = reads
        self._model = model

    def _note(self) -> None:
        if ("kw",) not in self._reads:
            if not self._model.rules.tracks_kernel_writes:
                raise Unsupported("check_step reads m.kernel_writes (the kernel's writes of "
                                  f"the last move), which the export of "
                                  f"{self._model.variant} does not track")
            self._reads[("kw",)] = frozenset(list.__iter__(self))

    def __iter__(self):
        self._note()
        return list.__iter__(self)

    def __len__(self):
        self._note()
        return list.__len__(self)

    def __getitem__(self, index):
        self._note()
        return list.__getitem__(self, index)


class _Untracked(list):
    """A machine list a check may not read: the export does not track it."""

    def __init__(self, name: str, data=()):
        super().__init__(data)
        self.name = name

    def _read(self, *args):
        raise Unsupported(f"check_step reads {self.name}, which the export does not track")

    __iter__ = __len__ = __getitem__ = __contains__ = __setitem__ = _read


# a thread's kernel state the Promela machine holds, and how
_K_EXPORTED = ("rseq", "cpu", "last_cpu", "events", "notify", "status", "extra")


class _Learner:
    """Runs one learned function on the Python machine with its state
    wrapped in recordings; ``reads`` (input name -> value, in the order
    read) and the writes tell the outcome."""

    def __init__(self, model: Model, ghost: bool):
        self.model = model
        self.ghost = ghost

    def __enter__(self):
        m = self.model.m
        self.reads: dict = {}
        self.memory = _Recording(m.memory, self.reads, lambda a: ("mem", a),
                                 lambda a: m.rodata.get(a, 0))
        m.memory = self.memory
        self.ks = []
        for t in m.threads:
            k = _Recording(t.k, self.reads, self._k_name(t.tid))
            self.ks.append(k)
            t.k = k
        self.before = (m.regions, m.cpus[:], m.membarrier_registered)
        if self.ghost:
            self.ghost_rec = _WholeGhost(m.ghost, self.reads, self.model.ghost_number(m.ghost))
            m.ghost = self.ghost_rec
            self.lists = (m.used, m.cpus)
            m.kernel_writes = _KernelWrites(m.kernel_writes, self.reads, self.model)
            m.used = _Untracked("m.used (the budgets used)")
            m.cpus = _Untracked("m.cpus (use the threads' kernel state 'cpu')")
        return self

    def _k_name(self, tid):
        def name(key):
            if key is None:
                return f"T{tid}'s kernel state"
            if key not in _K_EXPORTED and key not in self.model.rules.k_keys:
                raise Unsupported(f"a learned function reads T{tid}'s kernel state "
                                  f"{key!r}, which the Promela machine lacks")
            return ("k", tid, key)
        return name

    def __exit__(self, *exc) -> None:
        m = self.model.m
        m.memory = self.memory.plain()
        for t, k in zip(m.threads, self.ks):
            t.k = k.plain()
        if self.ghost:
            m.ghost = self.ghost_rec.plain()
            m.kernel_writes = []
            m.used, m.cpus = self.lists
        if exc[0] is None and self.before != (m.regions, m.cpus, m.membarrier_registered):
            raise Unsupported("a learned function changed the memory map, the CPUs or the "
                              "membarrier registration, which the export does not track")
        if "extra" in self.model.rules.k_keys:
            return  # the variant's rules hold its registration state (_spin_variants)
        extra = [v for k in self.ks for key, v in k.writes.items() if key == "extra"]
        if any(v != () for v in extra):
            raise Unsupported("the variant keeps registration state in 'extra' "
                              "(not exported)")
        # 'extra' is () throughout: no input
        for key in [r for r in self.reads if r[0] == "k" and r[2] == "extra"]:
            if self.reads[key] != ():
                raise Unsupported("the variant keeps registration state in 'extra' "
                                  "(not exported)")
            del self.reads[key]

    def kernel_writes(self) -> tuple:
        """The writes to threads' kernel state, as ((tid, key, value), ...)."""
        out = []
        for tid, k in enumerate(self.ks, 1):
            for key, value in k.writes.items():
                if key == "extra" and key not in self.model.rules.k_keys:
                    continue
                if key not in ("rseq", "notify", "events", *self.model.rules.k_keys):
                    raise Unsupported(f"a learned function writes T{tid}'s kernel state "
                                      f"{key!r}, which the export does not track")
                out.append((tid, key, value))
        return tuple(out)


def _uses_info(check) -> bool:
    """Whether ``check(m, info)`` reads its ``info`` argument at all: the
    judgments of a check that does not are shared by every move."""
    code = check.__code__
    if code.co_argcount < 2:
        return False
    name = code.co_varnames[1]
    if name in code.co_cellvars:
        return True
    for ins in dis.get_instructions(code):
        if ins.opname.startswith("LOAD_FAST"):  # LOAD_FAST_LOAD_FAST (3.13): a pair
            names = ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)
            if name in names:
                return True
    return False


class _SyscallTap:
    """The machine's variant, with the system calls of ``LEARNED_SYSCALLS``
    recorded for the export: the outcome (result, memory and kernel-state
    writes, or a kill) keyed on the inputs the variant's code read."""

    def __init__(self, inner, model: Model):
        self._inner = inner
        self._model = model

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def syscall(self, m: Machine, t, step: Syscall):
        if step.name not in LEARNED_SYSCALLS or step.name in self._model.rules.syscalls:
            # not learned, or written in Promela by the variant's rules
            return self._inner.syscall(m, t, step)
        tree = self._model.effects.setdefault((t.tid, t.state), _Tree())
        what = f"the system call {step.name}()"
        try:
            with _Learner(self._model, ghost=False) as rec:
                result, leaves_cpu = self._inner.syscall(m, t, step)
        except Killed:
            tree.add(rec.reads, ("kill",), what)
            raise
        if leaves_cpu:
            raise Unsupported(f"{what} leaves the CPU (not exported)")
        writes = tuple(sorted(rec.memory.writes.items()))
        tree.add(rec.reads, ("ok", result, writes, rec.kernel_writes()), what)
        return result, leaves_cpu


# ---------------------------------------------------------------- export


@dataclass
class _Tables:
    """Numbering of what the Promela model names: addresses and values."""

    addrs: dict[int, int] = field(default_factory=dict)
    values: dict[object, int] = field(default_factory=lambda: {0: 0})

    def a(self, addr: int) -> int:
        return self.addrs.setdefault(addr, len(self.addrs))

    def v(self, value) -> int:
        if value is None or value is False:
            value = 0
        if value is True:
            value = 1
        return self.values.setdefault(value, len(self.values))


class Model:
    """One scenario under one variant, ready to export repeatedly as its
    programs' automata grow."""

    def __init__(self, scenario, variant: str, bounds: dict[str, int], threads: int | None = None):
        why = supported(scenario, variant)
        if why:
            raise Unsupported(f"{scenario.name} under {variant}: {why}")
        self.scenario = scenario
        self.variant = variant
        self.bounds = bounds
        self.nthreads = threads
        self.m: Machine = scenario.build(variant, threads)
        self.root = self.m.snapshot()
        self.lines: dict[int, tuple] = {}
        # learned functions (see "learned functions" above) and their numbering
        self.check = scenario.check_step
        self.by_move = self.check is not None and _uses_info(self.check)
        self.judgments: dict[object, _Tree] = {}  # context -> check_step's tree
        self.effects: dict[tuple, _Tree] = {}  # (tid, state) -> a system call's tree
        self.contexts: dict[object, int] = {"kernel": 1}  # judgment context -> je
        self.ghosts: dict[tuple, int] = {}  # ghost state -> number
        self.ghost_values: list[dict] = []
        self.regs: dict[object, int] = {None: 0}  # registration -> number
        self.messages: list[str | None] = [None]  # stepbad -> check_step's message
        self.kw_bits: dict[tuple, int] = {}  # a kernel write -> its bit in kw
        self.track_kw = False
        self.ghost_number(self.m.ghost)
        # the variant's own kernel rules (sched_state, the slice extension,
        # seed 000's negotiation): Promela written in _spin_variants
        self.rules = rules_for(self)
        self.m.variant = _SyscallTap(self.m.variant, self)

    # -- numbering of what the learned functions read and write
    def ghost_number(self, ghost: dict) -> int:
        key = tuple(sorted(ghost.items(), key=repr))
        number = self.ghosts.get(key)
        if number is None:
            number = self.ghosts[key] = len(self.ghost_values)
            self.ghost_values.append(dict(ghost))
        return number

    def _input_value(self, name: tuple):
        """An input's value in the Python machine's current state."""
        kind = name[0]
        if kind == "mem":
            return self.m.read(name[1])
        if kind == "ghost":
            return self.ghost_number(self.m.ghost)
        if kind == "k":
            return self.m.thread(name[1]).k[name[2]]
        return _EMPTY  # an input this lookup does not know: run the function

    def reg_number(self, registration) -> int:
        return self.regs.setdefault(registration, len(self.regs))

    def message_number(self, message: str) -> int:
        if message not in self.messages:
            self.messages.append(message)
        return self.messages.index(message)

    def kw_bit(self, entry: tuple) -> int:
        """The bit of a kernel write (addr, size, field, tid) in ``kw``."""
        bit = self.kw_bits.setdefault(entry, len(self.kw_bits))
        if bit > 30:
            raise Unsupported("more than 31 distinct kernel writes to track for check_step")
        return bit

    def context_number(self, context) -> int:
        return self.contexts.setdefault(context, len(self.contexts) + 1)

    def apply(self, move: tuple) -> None:
        """One move of the Python machine, with check_step judged (and
        learned) after it as the explorer does."""
        m = self.m
        state = m.thread(move[1]).state if move[0] in ("step", "choose") else None
        info = m.apply(move)
        if self.check is None or m.killed is not None:
            return
        if not self.by_move:
            context = "any"
        elif info is None:
            context = "kernel"
        else:
            context = (info[0].tid, state, info[2])
        known = self.judgments.get(context)
        if known is not None:
            # judged before with these inputs: the outcome without the call
            # (most of the seed search's moves)
            leaf = known.lookup(self._input_value)
            if leaf is not _EMPTY:
                if leaf[1] is not None:
                    m.ghost = dict(self.ghost_values[leaf[1]])
                return
        with _Learner(self, ghost=True) as rec:
            message = self.check(m, info)
        if rec.memory.writes or rec.kernel_writes():
            raise Unsupported("check_step changes the machine (memory or a thread's kernel "
                              "state); only the ghost state is exported")
        leaf = (self.message_number(message) if message else 0,
                self.ghost_number(m.ghost) if rec.ghost_rec.touched else None)
        self.judgments.setdefault(context, _Tree()).add(rec.reads, leaf, "check_step")

    # -- completing the automata
    def seed(self, runs: int = 300, seed: int = 0) -> None:
        """Random executions at the bounds: most edges the search needs."""
        m, limits = self.m, self.limits
        rng = random.Random(seed)
        for _ in range(runs):
            m.restore(self.root)
            for _ in range(400):
                moves = m.choices(limits, limits[2] > 0)
                if not moves:
                    break
                self.apply(moves[rng.randrange(len(moves))])

    def seed_search(self, max_states: int = SEED_STATES) -> bool:
        """An exhaustive search of the unreduced machine, up to
        ``max_states``: at small bounds every edge SPIN needs, in one go
        (True when it completed)."""
        m, limits = self.m, self.limits
        m.restore(self.root)
        m.reduce = False
        seen = {m.key()}
        stack = [self.root]
        try:
            while stack:
                snap = stack.pop()
                m.restore(snap)
                for move in m.choices(limits, limits[2] > 0):
                    m.restore(snap)
                    self.apply(move)
                    key = m.key()
                    if key not in seen:
                        seen.add(key)
                        if len(seen) > max_states:
                            return False
                        stack.append(m.snapshot())
            return True
        finally:
            m.reduce = True

    def run_moves(self, moves: list[tuple]) -> None:
        """Run a schedule (from a SPIN trail) in the Python machine: the
        edges it takes are computed and kept in the automata."""
        m = self.m
        m.restore(self.root)
        for move in moves:
            if m.killed is not None:
                break
            self.apply(move)

    @property
    def limits(self) -> tuple[int, int, int]:
        b = self.bounds
        return (b["preemptions"], b["migrations"], b["signals"])

    # -- Promela
    def promela(self, bad: tuple | None = None) -> str:
        """The model as Promela text.  With ``bad`` (a final projection), an
        assertion that the final state is not that one."""
        m = self.m
        m.restore(self.root)
        v = m.variant
        tb = self.tb = _Tables()
        threads = m.threads
        n = len(threads)
        ncpus = m.ncpus
        nocpu = ncpus
        offsets = v.offsets
        # descriptors: value -> section number (1-based)
        secs = sorted(m.sections.values(), key=lambda c: c.start_ip)
        sec_no = {c.name: i + 1 for i, c in enumerate(secs)}

        def sec_of(ip: int) -> int:
            for i, c in enumerate(secs):
                if c.start_ip <= ip < c.post_commit_ip:
                    return i + 1
            return 0

        for cpu in range(ncpus + 1):
            tb.v(cpu)  # a CPU's value number is the CPU: the kernel writes cpu[t]
        for c in secs:
            tb.v(c.desc)
        area_fields = []
        for t in threads:
            area = self._area(t)
            names = ("cpu_id_start", "cpu_id", "rseq_cs")
            area_fields.append({f: tb.a(area + offsets[f]) for f in names})
        for addr in sorted(m.memory):
            tb.a(addr)
        # node_id and mm_cid: not written in Promela, except by the
        # variant rules that write them (size-flag-2020)
        read_only = tuple(f for f in ("node_id", "mm_cid") if f not in self.rules.written_ids)
        unreadable = {
            self._area(t) + offsets[f] for t in threads for f in read_only if f in offsets
        }
        self.unexported = unreadable
        # walk every known state of every thread: addresses and values
        for t in threads:
            for s, step in enumerate(t.table.steps):
                if step is None:
                    continue
                cls = type(step)
                if cls in (Load, Store, Cas):
                    if step.addr in unreadable and cls is Load:
                        raise Unsupported(f"{t.name} reads {m.sym(step.addr)} (not exported)")
                    tb.a(step.addr)
                    if cls is Store:
                        tb.v(step.value)
                    elif cls is Cas:
                        tb.v(step.expected)
                        tb.v(step.new)
                elif cls is Syscall:
                    known = {*_SYSCALL_RESULTS, "getcpu", "sched_yield", *LEARNED_SYSCALLS,
                             *self.rules.syscalls}
                    if step.name not in known:
                        raise Unsupported(f"{t.name} makes the system call {step.name}()")
                elif cls not in (Choose, Mark):
                    raise Unsupported(f"{t.name} yields {step!r}")
                for event in t.table.edges[s]:
                    if event[0] == "s":
                        tb.v(event[1])
        self._number_learned(tb)
        self.rules.prepare(tb, area_fields)
        for addr in list(tb.addrs):
            tb.v(m.read(addr))
        out: list[str] = []
        w = out.append
        nv = len(tb.values)
        vtype = "byte" if nv < 256 else "short"
        na = len(tb.addrs)
        maxstates = max(len(t.table.steps) for t in threads)
        ptype = "byte" if maxstates < 255 else "short"
        P, M, S = self.limits
        w(f"/* {self.scenario.name} under {self.variant}: generated by rseq.model.spin */")
        w(f"#define NT {n}")
        w(f"#define NC {ncpus}")
        w(f"#define NOCPU {nocpu}")
        w(f"#define PREEMPTIONS {P}")
        w(f"#define MIGRATIONS {M}")
        w(f"#define SIGNALS {S}")
        w(f"{vtype} mem[{na}];")
        w(f"{ptype} pc[{n + 1}];")
        w(f"byte cpu[{n + 1}]; byte last[{n + 1}]; byte ev[{n + 1}]; bit notify[{n + 1}];")
        w(f"byte status[{n + 1}];  /* 0 run, 1 exit, 2 killed */")
        w(f"byte cpus[{ncpus}];")
        w("byte up; byte um; byte us; bit killed; bit incomplete;")
        w(f"hidden {vtype} val; hidden byte sec; hidden byte ipsec; hidden byte tmp;")
        gtype = "byte" if len(self.ghost_values) < 250 else "short"
        w(f"byte reg[{n + 1}];  /* the thread's registration (0: none), numbered */")
        w(f"{gtype} ghost;  /* the scenario's ghost state, numbered */")
        w("byte stepbad;  /* the first check_step violation, numbered */")
        w("bit stepstop;  /* paths stop at the first failed judgment (RSEQ_STEPSTOP) */")
        w("hidden short je;  /* the judgment context of the last move */")
        w("hidden byte sys;  /* the step is a system call */")
        w("hidden byte leave;  /* the system call leaves the CPU */")
        w("hidden byte yielded;  /* the thread left its CPU: after_yield */")
        if self.track_kw:
            w("hidden int kw;  /* the kernel's writes in this move, a bit each (kw_bit) */")
        self.rules.declare(w)
        # ---- per-thread tables as inlines over pc
        self.table_init: list[str] = []
        for i, t in enumerate(threads):
            tid = i + 1
            self._thread_inlines(w, t, tid, tb, sec_of, area_fields[i])
        # ---- value -> cpu (for cpu_id_start writes) and descriptor -> section
        w("inline desc_section(x) {")
        w("  if")
        for c in secs:
            w(f"  :: x == {tb.v(c.desc)} -> sec = {sec_no[c.name]}")
        w("  :: else -> sec = 0")
        w("  fi")
        w("}")
        self._kernel(w, threads, tb, area_fields, ncpus)
        self.rules.inlines(w)  # the hooks _kernel calls (after its macros)
        self._judge_inline(w, tb)
        # ---- the scheduler: one move per line
        lines: dict[int, tuple] = {}
        body: list[tuple[str, tuple]] = []
        for i, t in enumerate(threads):
            tid = i + 1
            body.append((f"canstep_{tid} -> step_{tid}()", ("step", tid)))
            nmax = max((st.n for st in t.table.steps if type(st) is Choose), default=0)
            for k in range(nmax):
                body.append((f"canchoose_{tid}({k}) -> choose_{tid}({k})", ("choose", tid, k)))
        user_moves = len(body)
        for c in range(ncpus):
            for tid in range(1, n + 1):
                body.append((f"cpus[{c}] == 0 && waiting({tid}) -> schedule_in_{tid}({c})",
                             ("schedule", c, tid)))
        # (a move whose budget is 0 is left out: less code for cc to compile)
        for c in range(ncpus if P > 0 else 0):
            body.append((f"up < PREEMPTIONS && cpus[{c}] != 0 && hasstep(cpus[{c}]) -> "
                         f"up++; preempt({c})", ("preempt", c, None)))
            for tid in range(1, n + 1):
                move = f"leave_cpu({c}); schedule_in_{tid}({c})"
                if self.rules.intercepts:  # a slice grant may defer it
                    move = (f"tmp = cpus[{c}]; slice_intercepts(tmp, {tid}); "
                            f"if :: intercepted -> skip :: else -> {move} fi")
                body.append((f"up < PREEMPTIONS && cpus[{c}] != 0 && hasstep(cpus[{c}]) && "
                             f"waiting({tid}) -> up++; {move}", ("preempt", c, tid)))
        for tid in range(1, n + 1 if M > 0 else 1):
            for c in range(ncpus):
                body.append((f"um < MIGRATIONS && cpu[{tid}] != NOCPU && cpu[{tid}] != {c} && "
                             f"hasstep({tid}) -> um++; leave_cpu({c}); "
                             f"switch_out({tid}, {EV_PREEMPT}); schedule_in_{tid}({c})",
                             ("migrate", tid, c)))
        if S > 0:
            for tid in range(1, n + 1):
                body.append((f"us < SIGNALS && cpu[{tid}] != NOCPU && hasstep({tid}) -> us++; "
                             f"signal_{tid}()", ("signal", tid)))
        if self.check is not None:
            # check_step after every move: user steps set je on their edge;
            # the scheduler's moves are one context, left out when judged
            # fine with nothing to update
            kernel = self.judgments.get("kernel" if self.by_move else "any")
            quiet = kernel is not None and kernel.constant == (0, None)
            kernel_judge = "" if quiet else "; je = 1; judge()" if self.by_move else "; judge()"
            body = [(text + ("; judge()" if i < user_moves else kernel_judge), move)
                    for i, (text, move) in enumerate(body)]
        w("active proctype machine() {")
        w('  c_code { now.stepstop = (getenv("RSEQ_STEPSTOP") != NULL); };')
        for line in self.table_init:
            w(f"  {line};")
        w("  d_step {")
        self.anchor = len(out) + 1  # the line of "mem[0] = ...": finds SPIN's line offset
        for addr, ai in sorted(tb.addrs.items(), key=lambda item: item[1]):
            w(f"    mem[{ai}] = {tb.v(m.read(addr))};")
        for i, t in enumerate(threads):
            tid = i + 1
            k = t.k
            w(f"    pc[{tid}] = {t.state}; cpu[{tid}] = {nocpu if k['cpu'] is None else k['cpu']}; "
              f"last[{tid}] = {nocpu if k['last_cpu'] is None else k['last_cpu']}; "
              f"ev[{tid}] = {k['events']}; notify[{tid}] = {int(k['notify'])}; "
              f"status[{tid}] = {0 if k['status'] == 'run' else 1}; "
              f"reg[{tid}] = {self.reg_number(k['rseq'])};")
        w(f"    ghost = {self.ghost_number(m.ghost)};")
        self.rules.init(w)
        for c in range(ncpus):
            w(f"    cpus[{c}] = {0 if m.cpus[c] is None else m.cpus[c]};  /* 0: idle */")
        w("  }")
        w("  do")
        start = len(out) + 1
        # A check_step violation (stepbad) does not end the path: the final
        # states stay those of the unchecked machine (``_finals``), and the
        # verdict is violated when any final state carries one.  With
        # stepstop (the search for the trace) the path ends at the first:
        # the exit is the first branch, so pan's depth-first search takes it
        # at the first state where a judgment failed.
        w("  :: killed || incomplete || alldone || (stepstop && stepbad != 0) -> break")
        for text, move in body:
            lines[len(out) + 1] = move
            reset = "; kw = 0" if self.track_kw else ""  # judged: the next move's writes
            w(f"  :: d_step {{ !killed && !incomplete && {text}{reset} }}")
        w("  od;")
        del start
        w("  assert(!incomplete);")
        w("  assert(!stepstop || stepbad == 0);")
        shared = self.shared_addresses()
        every = sorted(tb.addrs, key=lambda a: tb.addrs[a])  # check_final may read any of it
        if bad is None:
            fmt = " ".join(["%d"] * (6 + len(every)))
            args = ", ".join(["now.killed", "now.up", "now.um", "now.us", "now.ghost",
                              "now.stepbad"] + [f"now.mem[{tb.a(a)}]" for a in every])
            w(f'  c_code {{ printf("FINAL {fmt}\\n", {args}); }}')
        else:
            killed, used, memory, ghost, stepbad = bad
            values = dict(memory)
            conds = [f"killed == {int(killed)}", f"up == {used[0]}", f"um == {used[1]}",
                     f"us == {used[2]}", f"ghost == {ghost}", f"stepbad == {stepbad}"]
            conds += [f"mem[{tb.a(a)}] == {tb.v(values.get(a, 0))}" for a in every]
            w(f"  assert(!({' && '.join(conds)}))")
        w("}")
        self.lines = lines
        self.tb = tb
        self.shared = shared
        self.every = every
        return "\n".join(out) + "\n"

    def shared_addresses(self) -> list[int]:
        from ._finals import _PRIVATE

        m = self.m
        private = [(r.start, r.end) for r in m.regions if _PRIVATE.match(r.name)]
        addrs = set(m.memory)
        for t in m.threads:
            for step in t.table.steps:
                if type(step) in (Load, Store, Cas):
                    addrs.add(step.addr)
        return sorted(a for a in addrs if not any(s <= a < e for s, e in private))

    def _thread_inlines(self, w, t, tid, tb, sec_of, fields) -> None:
        m = self.m
        table = t.table
        steps = table.steps
        known = range(len(steps))
        # hasstep / kind
        finished = [s for s in known if steps[s] is None]
        chooses = [s for s in known if type(steps[s]) is Choose]
        w(f"#define hasstep_{tid} ({' && '.join(f'pc[{tid}] != {s}' for s in finished) or 'true'})")
        choosing = " || ".join(f"pc[{tid}] == {s}" for s in chooses) or "false"
        w(f"#define ischoose_{tid} ({choosing})")
        w(f"#define canstep_{tid} (cpu[{tid}] != NOCPU && status[{tid}] == 0 && hasstep_{tid} "
          f"&& !ischoose_{tid})")
        cond = " || ".join(f"(pc[{tid}] == {s} && k < {steps[s].n})" for s in chooses) or "false"
        w(f"#define canchoose_{tid}(k) (cpu[{tid}] != NOCPU && status[{tid}] == 0 && ({cond}))")
        w(f"inline step_{tid}() {{")
        # A system call's entry (the kill of one inside a section) and its
        # return to user space are written once, around the step's own
        # code: inlined per system-call state they overflow SPIN's d_step.
        syscalls = [s for s in known if type(steps[s]) is Syscall]
        if syscalls:
            fatal = m.variant.syscall_in_cs == "fatal"
            entry = f"; syscall_entry({tid})" if fatal else ""
            w(f"  if :: {' || '.join(f'pc[{tid}] == {s}' for s in syscalls)} -> "
              f"sys = 1{entry} :: else -> sys = 0 fi;")
        w("  if")
        for s in known:
            step = steps[s]
            if step is None or type(step) is Choose:
                continue
            w(f"  :: pc[{tid}] == {s} -> " + self._step_code(t, tid, s, step, tb, fields))
        w("  fi;")
        if syscalls:
            # Machine._syscall: leave the CPU (sched_yield, the end of a
            # slice grant), or return to user space
            w(f"  if :: sys && !killed && cpu[{tid}] != NOCPU -> "
              f"if :: leave -> switch_out({tid}, {EV_PREEMPT}); yielded = 1 "
              f":: else -> return_to_user_{tid}() fi "
              ":: else -> skip fi;")
        w(f"  after_step({tid});")
        # the variant's after_yield, once (a d_step holds at most 2048
        # jumps): Python runs it before _after_user_step, which does not
        # touch the thread that runs next, nor the yielding thread's CPU
        w(f"  if :: yielded -> yielded = 0; after_yield({tid}) :: else -> skip fi")
        w("}")
        w(f"inline choose_{tid}(k) {{")
        if chooses:
            w("  if")
            for s in chooses:
                for k in range(steps[s].n):
                    nxt = table.edges[s].get(("s", k))
                    act = self._edge(tid, s, k, nxt)
                    w(f"  :: pc[{tid}] == {s} && k == {k} -> {act}")
            w("  fi;")
            w(f"  after_step({tid});")
            w(f"  if :: yielded -> yielded = 0; after_yield({tid}) :: else -> skip fi")
        else:
            w("  skip")
        w("}")
        # the section of the current ip and the abort edge: tables indexed
        # by pc (hidden: not in the state vector), so that the kernel's
        # fixup, expanded into every scheduler move, stays one lookup
        # (an if-chain per state made SPIN's d_steps too long)
        nstates = len(steps)
        w(f"hidden byte ipsec_tab_{tid}[{nstates}];")
        w(f"hidden short abort_tab_{tid}[{nstates}];  /* -1: unknown edge, -2: none */")
        w(f"inline ipsec_{tid}() {{ ipsec = ipsec_tab_{tid}[pc[{tid}]] }}")
        w(f"inline abort_{tid}() {{")
        w(f"  if :: abort_tab_{tid}[pc[{tid}]] >= 0 -> pc[{tid}] = abort_tab_{tid}[pc[{tid}]] "
          f":: abort_tab_{tid}[pc[{tid}]] == -1 -> incomplete = 1 :: else -> skip fi")
        w("}")
        init = self.table_init
        for s in known:
            step = steps[s]
            ip = OUTSIDE_IP if step is None or step.ip is None else step.ip
            sec = sec_of(ip)
            if sec:
                init.append(f"ipsec_tab_{tid}[{s}] = {sec}")
            target = -2
            if step is not None and step.ip is not None and sec_of(step.ip):
                nxt = table.edges[s].get(("t",))
                target = nxt if nxt is not None else -1
            init.append(f"abort_tab_{tid}[{s}] = {target}")
        w(f"inline handler_{tid}() {{")
        w("  if")
        for s in known:
            if steps[s] is None or self.scenario.handler is None:
                continue
            nxt = table.edges[s].get(("h",))
            act = f"pc[{tid}] = {nxt}" if nxt is not None else "incomplete = 1"
            w(f"  :: pc[{tid}] == {s} -> {act}")
        w("  :: else -> skip")
        w("  fi")
        w("}")
        del m

    # -- the learned functions in Promela
    def _area(self, t) -> int:
        """The thread's rseq area: the registered one, or the one its
        program registers (every registration must name it)."""
        reg = t.k["rseq"]
        return t.ctx.area if reg is None else reg[0]

    def _edge(self, tid: int, s: int, result, nxt: int | None) -> str:
        """A program edge: the next state, and the judgment context of
        check_step (by move) for the step that took it."""
        if nxt is None:
            return "incomplete = 1"
        if not self.by_move:
            return f"pc[{tid}] = {nxt}"
        context = (tid, s, result)
        tree = self.judgments.get(context)
        if tree is not None and tree.constant == (0, None):
            return f"pc[{tid}] = {nxt}; je = 0"  # judged: fine, nothing to update
        return f"pc[{tid}] = {nxt}; je = {self.context_number(context)}"

    _K_VARS = {"rseq": "reg", "cpu": "cpu", "last_cpu": "last", "events": "ev",
               "notify": "notify", "status": "status"}

    def _k_value(self, key: str, value) -> int:
        if key == "rseq":
            return self.reg_number(value)
        if key in ("cpu", "last_cpu"):
            return self.m.ncpus if value is None else value
        if key == "status":
            return {"run": 0, "exit": 1, "killed": 2}[value]
        return int(value)

    def _test(self, name: tuple, value) -> str:
        """An input of a learned function as a Promela condition."""
        if name[0] == "mem":
            if name[1] in self.unexported:
                raise Unsupported(f"a learned function reads {self.m.sym(name[1])} "
                                  "(not exported)")
            return f"mem[{self.tb.a(name[1])}] == {self.tb.v(value)}"
        if name[0] == "ghost":
            return f"ghost == {value}"
        if name[0] == "kw":
            return f"kw == {sum(1 << self.kw_bit(entry) for entry in value)}"
        _, tid, key = name
        if key in self.rules.k_keys:
            test = self.rules.k_test(tid, key, value)
            if test is None:
                raise Unsupported(f"a learned function reads T{tid}'s {key} = {value!r}, "
                                  f"which the rules of {self.variant} do not hold")
            return test
        return f"{self._K_VARS[key]}[{tid}] == {self._k_value(key, value)}"

    def _effect(self, tid: int, leaf: tuple, goto) -> str:
        """A system call's learned outcome: its writes, then the edge of its
        result."""
        if leaf[0] == "kill":
            return "kill()"
        _, result, memory, kernel = leaf
        parts = [f"mem[{self.tb.a(a)}] = {self.tb.v(v)}" for a, v in memory
                 if a not in self.unexported]
        for t, key, value in kernel:
            if key in self.rules.k_keys:
                write = self.rules.k_write(t, key, value)
                if write is None:
                    raise Unsupported(f"a learned function sets T{t}'s {key} to {value!r}, "
                                      f"which the rules of {self.variant} do not hold")
                parts.append(write)
                continue
            parts.append(f"{self._K_VARS[key]}[{t}] = {self._k_value(key, value)}")
        parts.append(goto(result))
        return "; ".join(parts)

    def _judgment(self, leaf: tuple) -> str:
        message, ghost = leaf
        parts = [] if ghost is None else [f"ghost = {ghost}"]
        if message:
            parts.append(f"if :: stepbad == 0 -> stepbad = {message} :: else -> skip fi")
        return "; ".join(parts) or "skip"

    def _judge_inline(self, w, tb) -> None:
        """judge(): check_step's learned judgments after a move (je names
        the context when the check reads the move)."""
        w("inline judge() {")
        if self.check is None:
            w("  skip")
        elif not self.by_move:
            tree = self.judgments.get("any")
            code = "incomplete = 1" if tree is None else tree.code(self._test, self._judgment)
            w(f"  if :: killed -> skip :: else -> {code} fi")
        else:
            w("  if")
            w("  :: killed || je == 0 -> skip")
            # contexts judged alike share one branch (a d_step holds at most
            # 2048 jumps, and judge() is in every move)
            alike: dict[str, list[int]] = {}
            for context, tree in self.judgments.items():
                if context != "kernel" and tree.constant == (0, None):
                    continue  # its edges set je = 0
                code = tree.code(self._test, self._judgment)
                alike.setdefault(code, []).append(self.context_number(context))
            for code, numbers in alike.items():
                cond = " || ".join(f"je == {number}" for number in numbers)
                w(f"  :: !killed && ({cond}) -> {code}")
            w("  :: else -> incomplete = 1")
            w("  fi")
        w("}")

    def _number_learned(self, tb) -> None:
        """Number the addresses and values the learned functions use before
        the declarations are written; check what the export assumes of the
        registrations."""
        def walk(tree: _Tree, leaf) -> None:
            if tree.input is None:
                leaf(tree.leaf)
                return
            for value, child in tree.branches.items():
                if tree.input[0] == "kw":
                    self.track_kw = True
                    for entry in value:
                        self.kw_bit(entry)
                elif tree.input[0] == "mem":
                    tb.a(tree.input[1])
                    tb.v(value)
                elif tree.input[0] == "k" and tree.input[2] == "rseq":
                    self.reg_number(value)
                walk(child, leaf)

        def effect(leaf) -> None:
            if leaf[0] == "kill":
                return
            for a, v in leaf[2]:
                if a not in self.unexported:
                    tb.a(a)
                    tb.v(v)
            for tid, key, value in leaf[3]:
                if key == "rseq" and value is not None:
                    t = self.m.thread(tid)
                    if value[0] != self._area(t) or value[2] != t.ctx.signature:
                        raise Unsupported(f"{t.name} registers another area or signature "
                                          "than its own (not exported)")
                    self.reg_number(value)

        self.track_kw = False  # check_step reads the kernel's writes of a move
        for tree in self.effects.values():
            walk(tree, effect)
        for tree in self.judgments.values():
            walk(tree, lambda leaf: None)

    def _step_code(self, t, tid, s, step, tb, fields) -> str:
        m = self.m
        edges = t.table.edges[s]
        cls = type(step)

        def branch_on(expr: str) -> str:
            alts = []
            for event, nxt in edges.items():
                if event[0] == "s":
                    alts.append(f":: {expr} == {tb.v(event[1])} -> "
                                + self._edge(tid, s, event[1], nxt))
            alts.append(":: else -> incomplete = 1")
            return "if " + " ".join(alts) + " fi"

        def goto(result) -> str:
            return self._edge(tid, s, result, edges.get(("s", result)))

        if cls is Load:
            if not m.accessible(step.addr, step.size, False):
                return "kill()"
            return f"val = mem[{tb.a(step.addr)}]; " + branch_on("val")
        if cls is Store:
            if not m.accessible(step.addr, step.size, True):
                return "kill()"
            return f"mem[{tb.a(step.addr)}] = {tb.v(step.value)}; " + goto(None)
        if cls is Cas:
            if not m.accessible(step.addr, step.size, True):
                return "kill()"
            a = tb.a(step.addr)
            return (f"val = mem[{a}]; if :: val == {tb.v(step.expected)} -> "
                    f"mem[{a}] = {tb.v(step.new)} "
                    f":: else -> skip fi; " + branch_on("val"))
        if cls is Mark:
            return goto(None)
        if cls is Syscall:
            # the entry and the return to user space are in step_<tid>();
            # leave = 1: the thread leaves its CPU instead of returning
            if step.name == "getcpu":
                default = branch_on(f"cpu[{tid}]")
            elif step.name == "sched_yield":
                default = goto(0) + "; leave = 1"
            elif step.name in self.rules.syscalls:
                default = None
            elif step.name in LEARNED_SYSCALLS:
                tree = self.effects.get((tid, s))
                default = ("incomplete = 1" if tree is None else
                           tree.code(self._test, lambda leaf: self._effect(tid, leaf, goto)))
            elif step.name in _SYSCALL_RESULTS:
                default = goto(_SYSCALL_RESULTS[step.name])
            else:
                default = None  # Variant.syscall's -ENOSYS, unless the variant's rules know it
            effect = self.rules.syscall(t, tid, step, branch_on, goto, default)
            if effect is None:
                if default is None:
                    raise Unsupported(f"{t.name} makes the system call {step.name}()")
                effect = default
            return f"leave = 0; if :: !killed -> {effect} :: else -> skip fi"
        raise Unsupported(f"{t.name} yields {step!r}")

    def _kernel(self, w, threads, tb, area_fields, ncpus) -> None:
        n = len(threads)

        def per_thread(name: str, template: str) -> None:
            params = "t, c" if name == "schedule_in" else "t"
            w(f"inline {name}({params}) {{")
            w("  if")
            for i in range(n):
                tid = i + 1
                w(f"  :: t == {tid} -> " + template.format(tid=tid, **area_fields[i]))
            w("  fi")
            w("}")

        any_step = " || ".join(f"(t == {i + 1} && hasstep_{i + 1})" for i in range(n))
        w(f"#define hasstep(t) ({any_step})")
        w("#define waiting(t) (status[t] == 0 && cpu[t] == NOCPU && hasstep(t))")
        done = " && ".join(f"(status[{i + 1}] != 0 || !hasstep_{i + 1})" for i in range(n))
        w(f"#define alldone ({done})")
        w("inline kill() {")
        w("  killed = 1;")
        for i in range(n):
            t = i + 1
            w(f"  if :: status[{t}] == 0 -> status[{t}] = 2; cpu[{t}] = NOCPU :: else -> skip fi;")
        for c in range(ncpus):
            w(f"  cpus[{c}] = 0;")
        w("}")
        # rseq_ip_fixup then the ID update, as Variant.resume.  The return to
        # user space and the schedule-in are written once per thread and
        # called by name where the thread is known (a move of a given
        # thread): an inline is text, and a dispatch over every thread in
        # every move made pan.c several times larger (cc's time dominates).
        # reg[t] != 0: the thread is registered (Machine.switch_out,
        # schedule_in, the signal move and Variant.resume test k["rseq"]).
        # The variant's hooks (update_ids_<tid>, on_switch_*, on_exit,
        # after_user_step, after_yield, slice_intercepts) are written by
        # self.rules (_spin_variants); kw_rseq_cs: the clear of rseq_cs as
        # a kernel write, where a check_step reads them.
        for i in range(n):
            tid = i + 1
            fields = area_fields[i]
            kw = self.rules.kernel_write(i, "rseq_cs", 8)
            w(f"inline fixup_{tid}() {{")
            w("  " + (
                "desc_section(mem[{rseq_cs}]); ipsec_{tid}(); "
                "if :: mem[{rseq_cs}] == 0 -> skip "
                ":: mem[{rseq_cs}] != 0 && sec != ipsec -> mem[{rseq_cs}] = 0{kw} "
                ":: mem[{rseq_cs}] != 0 && sec == ipsec && ev[{tid}] == 0 -> skip "
                ":: mem[{rseq_cs}] != 0 && sec == ipsec && ev[{tid}] != 0 -> "
                "mem[{rseq_cs}] = 0{kw}; abort_{tid}() fi; "
                "update_ids_{tid}()"
            ).format(tid=tid, kw=kw, **fields))
            w("}")
            w(f"inline return_to_user_{tid}() {{")
            w(f"  if :: notify[{tid}] -> notify[{tid}] = 0; "
              f"if :: reg[{tid}] != 0 -> fixup_{tid}() :: else -> skip fi; ev[{tid}] = 0 "
              ":: else -> skip fi")
            w("}")
            w(f"inline schedule_in_{tid}(c) {{")
            w(f"  if :: last[{tid}] != NOCPU && last[{tid}] != c -> "
              f"ev[{tid}] = ev[{tid}] | {EV_MIGRATE}; "
              f"if :: reg[{tid}] != 0 -> notify[{tid}] = 1 :: else -> skip fi "
              ":: else -> skip fi;")
            w(f"  cpu[{tid}] = c; cpus[c] = {tid};")
            w(f"  on_switch_in({tid});")
            w(f"  return_to_user_{tid}()")
            w("}")
            w(f"inline signal_{tid}() {{")
            w(f"  ev[{tid}] = ev[{tid}] | {EV_SIGNAL}; "
              f"if :: reg[{tid}] != 0 -> notify[{tid}] = 1 :: else -> skip fi;")
            w(f"  return_to_user_{tid}();")
            w(f"  handler_{tid}()")
            w("}")
        per_thread("syscall_entry", (
            "if :: reg[{tid}] != 0 -> desc_section(mem[{rseq_cs}]); ipsec_{tid}(); "
            "if :: mem[{rseq_cs}] != 0 && sec == ipsec -> kill() :: else -> skip fi "
            ":: else -> skip fi"
        ))
        per_thread("schedule_in", "schedule_in_{tid}(c)")
        w("inline switch_out(t, e) {")
        w("  cpus[cpu[t]] = 0; last[t] = cpu[t]; cpu[t] = NOCPU; "
          "if :: reg[t] != 0 -> ev[t] = ev[t] | e; notify[t] = 1 :: else -> skip fi;")
        w("  on_switch_out(t)")
        w("}")
        # Machine's preempt move: the variant may intercept it (a slice
        # grant); by a waiting thread, it is written in the move's line
        w("inline preempt(c) {  /* by another process: the thread comes back */")
        w("  tmp = cpus[c];")
        w("  slice_intercepts(tmp, 0);")
        w(f"  if :: intercepted -> skip :: else -> switch_out(tmp, {EV_PREEMPT}); "
          "schedule_in(tmp, c) fi")
        w("}")
        w("inline leave_cpu(c) {  /* the thread on c (if any) is switched out */")
        w("  tmp = cpus[c];")
        w(f"  if :: tmp != 0 -> switch_out(tmp, {EV_PREEMPT}) :: else -> skip fi")
        w("}")
        # Machine._after_user_step: the exit, or the variant's rule after a step
        w("inline after_step(t) {")
        w("  if :: !killed && !hasstep(t) -> status[t] = 1; "
          "if :: cpu[t] != NOCPU -> cpus[cpu[t]] = 0; cpu[t] = NOCPU :: else -> skip fi; "
          "on_exit(t) "
          ":: !killed && hasstep(t) -> after_user_step(t) "
          ":: else -> skip fi")
        w("}")


# ---------------------------------------------------------------- running


@dataclass
class PanRun:
    output: str
    states: int = 0
    transitions: int = 0
    memory_mb: float = 0.0
    elapsed: float = 0.0
    depth: int = 0
    errors: int = 0
    finals: set = field(default_factory=set)


def _num(pattern: str, text: str, cast=int, default=0):
    found = re.search(pattern, text)
    return cast(found.group(1)) if found else default


class _Runner:
    def __init__(self, workdir: str, memory_mb: int, hash_compact: bool = False):
        self.spin, self.cc = tools()
        self.dir = workdir
        self.memory_mb = memory_mb
        self.hash_compact = hash_compact
        # -O1 where pan's own speed matters; -O0 compiles in half the time
        # and is enough for a model the Python seed search covered whole,
        # whose trails are then made shortest (-DREACH, pan -i: a few
        # re-searches of a small model)
        self.optimize = True

    def run(self, text: str, trails: int = 1) -> PanRun:
        pml = os.path.join(self.dir, "model.pml")
        with open(pml, "w") as f:
            f.write(text)
        self._call([self.spin, "-a", "model.pml"], "spin -a")
        # SAFETY: no cycle detection (the properties are assertions and
        # final states); COLLAPSE: compress state vectors (about 3-5x smaller);
        # HC4 (hash_compact): store a state as a 64-bit hash, a few times
        # smaller again, at a tiny risk that a collision hides a state
        storage = "-DHC4" if self.hash_compact else "-DCOLLAPSE"
        flags = ["-O1"] if self.optimize else ["-O0", "-DREACH"]
        self._call([self.cc, *flags, "-DSAFETY", storage, f"-DMEMLIM={self.memory_mb}",
                    "-DVECTORSZ=4096", "-o", "pan", "pan.c"], "cc pan.c")
        return self.search(trails)

    def search(self, trails: int = 1, stop_at_step: bool = False) -> PanRun:
        """Run the compiled pan.  ``stop_at_step``: the model's paths stop at
        the first failed check_step judgment, an assertion (one pan serves
        both searches; RSEQ_STEPSTOP is read by the model's first statement)."""
        for old in os.listdir(self.dir):
            if old.endswith(".trail"):
                os.unlink(os.path.join(self.dir, old))
        env = dict(os.environ)
        env.pop("RSEQ_STEPSTOP", None)
        if stop_at_step:
            env["RSEQ_STEPSTOP"] = "1"
        # -e -cN: a trail for each of the first errors, so that one round
        # of completing the automata learns many missing edges
        errors = ["-c1"] if trails == 1 else ["-e", f"-c{trails}"]
        if trails == 1 and not self.optimize:
            errors.insert(0, "-i")  # the shortest trail (compiled with -DREACH)
        proc = subprocess.run(["./pan", "-m1000000", "-w20", *errors], cwd=self.dir,
                              capture_output=True, text=True, env=env)
        out = proc.stdout + proc.stderr
        if ("out of memory" in out or "memory limit" in out.lower()
                or "MEMLIM bound" in out):
            raise PanOutOfMemory(f"pan ran out of its {self.memory_mb} MB: {out[-400:]}")
        run = PanRun(out)
        # large counts come in exponent form (1.2e+08 transitions)
        run.states = int(_num(r"([\d.e+]+) states, stored", out, float, 0))
        run.transitions = int(_num(r"([\d.e+]+) transitions", out, float, 0))
        run.memory_mb = _num(r"([\d.]+)\s+total actual memory usage", out, float, 0.0)
        run.elapsed = _num(r"elapsed time ([\d.e+]+) seconds", out, float, 0.0)
        run.depth = _num(r"depth reached (\d+)", out)
        run.errors = _num(r"errors: (\d+)", out)
        for line in out.splitlines():
            if line.startswith("FINAL "):
                run.finals.add(tuple(int(x) for x in line.split()[1:]))
        return run

    def trails(self) -> list[str]:
        names = [f for f in os.listdir(self.dir) if f.endswith(".trail")]
        return sorted(names, key=lambda f: int(re.sub(r"\D", "", f) or 0))

    def trail(self, lines: dict, anchor: int, name: str = "model.pml.trail") -> list[tuple]:
        """The moves of SPIN's trail: each scheduler branch is one line of
        the model, and spin -t -p names the line of every step it replays."""
        number = re.sub(r"\D", "", name.removesuffix(".trail").removeprefix("model.pml"))
        proc = subprocess.run([self.spin, f"-t{number}", "-p", "model.pml"], cwd=self.dir,
                              capture_output=True, text=True)
        moves = []
        done: set[int] = set()
        offset = None
        for line in proc.stdout.splitlines():
            found = re.search(r"^\s*(\d+):\s+proc.*model\.pml:(\d+) \(state \d+\)\s+\[(.*)\]", line)
            if not found:
                continue
            step, number, text = int(found.group(1)), int(found.group(2)), found.group(3)
            if step in done:
                continue  # the other statements of the same d_step
            if offset is None:
                if text.startswith("mem[1] = "):
                    # the second line of the initial d_step (spin names the
                    # first by the d_step's own line)
                    offset = number - anchor - 1
                continue
            if number - offset in lines:
                moves.append(lines[number - offset])
                done.add(step)
        if offset is None:
            raise RuntimeError("cannot read SPIN's trail: " + proc.stdout[-400:])
        return moves

    def _call(self, cmd: list[str], what: str) -> None:
        proc = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed: {(proc.stdout + proc.stderr)[-800:]}")


def _projection(model: Model, final: tuple) -> tuple:
    """SPIN's FINAL line as (killed, used, memory, ghost number, stepbad):
    the value numbers mapped back to values."""
    values = {i: v for v, i in model.tb.values.items()}
    killed, up, um, us, ghost, stepbad, *mem = final
    memory = tuple((a, values[x]) for a, x in zip(model.every, mem))
    return (bool(killed), (up, um, us), memory, ghost, stepbad)


def _shared(model: Model, memory: tuple) -> tuple:
    """The projection ``_finals`` compares: shared memory, zeros left out."""
    shared = set(model.shared)
    return tuple(sorted((a, v) for a, v in memory if a in shared and v != 0))


def _judge(model: Model, final: tuple) -> str | None:
    killed, used, proj, ghost, stepbad = final
    sc = model.scenario
    if stepbad:
        return model.messages[stepbad]
    if killed:
        return None if sc.allows_kill else "the process was killed"
    m = model.m
    m.restore(model.root)
    for a, v in proj:
        m.memory[a] = v
    m.used = list(used)
    m.ghost = dict(model.ghost_values[ghost])
    return sc.check_final(m) if sc.check_final else None


def check(
    scenario,
    variant: str | None = None,
    *,
    preemptions: int | None = None,
    migrations: int | None = None,
    signals: int | None = None,
    threads: int | None = None,
    memory_mb: int = 8192,
    hash_compact: bool = False,
    workdir: str | None = None,
    seed_states: int = SEED_STATES,
):
    """Check ``scenario`` with SPIN; returns a ``Result`` like ``explore``'s
    (mode "spin"), with a violation's trace replayed by the Python engine."""
    from ._explore import Result, _bounds, _resolve, replay
    scenario, variant = _resolve(scenario, variant)
    bounds = _bounds(scenario, preemptions, migrations, signals, threads)
    started = time.perf_counter()

    def seeded() -> tuple[Model, bool]:
        """A model seeded from the machine, and whether the seed search
        covered it whole (small)."""
        fresh = Model(scenario, variant, bounds, threads)
        whole = fresh.seed_search(seed_states)
        if not whole:
            fresh.seed()
        return fresh, whole

    # the scenarios that scale (the counters: no check_step, no
    # registration by the programs) learn their automata thread by thread
    # (_learn.py: well under a second at any thread count); the others,
    # and a learned model too large for SPIN, are seeded from the machine
    learned = scenario.scale is not None
    if learned:
        model, small = Model(scenario, variant, bounds, threads), False
        learn_programs(model.m, bounds["signals"] > 0)
    else:
        model, small = seeded()
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="rseq-spin-")
    try:
        runner = _Runner(workdir, memory_mb, hash_compact)
        runner.optimize = not small
        rounds = 0
        while True:
            rounds += 1
            try:
                run = runner.run(model.promela(), trails=TRAILS_PER_ROUND)
            except RuntimeError as e:
                if not (learned and " too long" in str(e)):
                    raise
                # the learned automata over-approximate too much for SPIN's
                # d_steps (pointer-chasing programs, system calls that
                # expand the kernel's return path): seed from the machine
                model, small = seeded()
                runner.optimize = not small
                learned = False
                continue
            if run.errors == 0:
                break
            if "incomplete" not in run.output or rounds >= MAX_ROUNDS:
                raise RuntimeError(f"pan stopped: {run.output[-800:]}")
            for name in runner.trails()[:TRAILS_PER_ROUND]:
                model.run_moves(runner.trail(model.lines, model.anchor, name))
        finals = {_projection(model, f) for f in run.finals}
        bad = None
        if any(final[4] for final in finals):
            bad = "step"  # a check_step judgment failed on some path
        else:
            for final in sorted(finals, key=repr):
                if _judge(model, final) is not None:
                    bad = final
                    break
        result = Result(
            scenario=scenario.name, variant=variant, mode="spin", holds=bad is None,
            expected=scenario.expected(variant), states=run.states, transitions=run.transitions,
            terminal_states=len(finals), elapsed=0.0, bounds=bounds,
        )
        result.memory_mb = run.memory_mb
        result.limits = {"memory_mb": memory_mb, "hash_compact": hash_compact}
        result.pan_seconds = run.elapsed
        result.rounds = rounds
        result.finals = {(final[0], _shared(model, final[2])) for final in finals}
        result.model = model  # its learned tables, for tests and curious users
        if bad is not None:
            if bad == "step":
                runner.search(stop_at_step=True)  # the same pan: no compile
            else:
                runner.run(model.promela(bad=bad))
            moves = runner.trail(model.lines, model.anchor)
            from ._explore import move_name

            schedule = [move_name(None, mv) for mv in moves]
            again = replay(scenario, schedule, variant, threads=threads, **{
                k: bounds[k] for k in ("preemptions", "migrations", "signals")})
            result.violation = again.violation or (
                "a check_step judgment failed" if bad == "step" else _judge(model, bad))
            result.trace = again.trace
            result.schedule = again.schedule
        result.elapsed = time.perf_counter() - started
        return result
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
