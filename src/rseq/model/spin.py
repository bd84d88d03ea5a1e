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
  variant's offsets and rules filled in;
- the property: SPIN prints every reachable final state (the shared memory,
  the budgets used, whether the process was killed) and the scenario's own
  ``check_final`` judges each; a violating final state becomes an assertion,
  and SPIN's trail to it is replayed by the Python engine, which prints the
  usual trace.

Bounds (preemptions, migrations, signals) are ``#define`` parameters; the
thread count is the scenario's (``--threads`` where the scenario scales).
What cannot be exported yet raises ``Unsupported`` with the reason:
``check_step`` properties, system calls other than the thread-private
ones, variants other than linux-4.18, linux-6.3 and freebsd-2021, programs
that read ``node_id``/``mm_cid`` (not modelled in Promela).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from ._machine import EV_MIGRATE, EV_PREEMPT, EV_SIGNAL, OUTSIDE_IP, Machine
from ._program import Cas, Choose, Load, Mark, Store, Syscall
from ._spin_variants import VARIANT_RULES, rules_for

SUPPORTED_VARIANTS = ("linux-4.18", "linux-6.3", "freebsd-2021", *VARIANT_RULES)
_SYSCALL_RESULTS = {"getpid": 0, "nop": 0, "write": 0}  # getcpu: the CPU
MAX_ROUNDS = 60  # model completion rounds before giving up
TRAILS_PER_ROUND = 20


class Unsupported(Exception):
    """The scenario (or variant) uses something the Promela export lacks."""


class SpinMissing(Exception):
    """spin or a C compiler is not installed."""


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
    if scenario.check_step is not None:
        return "its property is checked after every step (check_step), which the export lacks"
    if scenario.check_final is None and not scenario.allows_kill:
        return "it has no final-state property"
    rules = VARIANT_RULES.get(variant)
    if not scenario.preregister and (rules is None or not rules.registers):
        return "its threads register themselves (rseq system calls are not exported)"
    if scenario.variant_options:
        known = rules.options if rules is not None else ()
        unknown = sorted(set(scenario.variant_options) - set(known))
        if unknown:
            return f"it runs {variant} with options the export lacks: {', '.join(unknown)}"
    return None


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
        self.m: Machine = build(scenario, variant, threads)
        self.root = self.m.snapshot()
        self.lines: dict[int, tuple] = {}
        # the variant's own kernel rules (sched_state, slice extension, size
        # negotiation...): Promela written in _spin_variants
        self.rules = rules_for(self)

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
                m.apply(moves[rng.randrange(len(moves))])

    def seed_search(self, max_states: int = 100_000) -> bool:
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
                    m.apply(move)
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
            m.apply(move)

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
        tb = _Tables()
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
            area = t.ctx.area  # the area it registers (before the program starts, or itself)
            names = ("cpu_id_start", "cpu_id", "rseq_cs")
            area_fields.append({f: tb.a(area + offsets[f]) for f in names})
        for addr in sorted(m.memory):
            tb.a(addr)
        read_only = ("node_id", "mm_cid")
        unreadable = {
            t.ctx.area + offsets[f] for t in threads for f in read_only if f in offsets
        }
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
                    known = {*_SYSCALL_RESULTS, "getcpu", "sched_yield", *self.rules.syscalls}
                    if step.name not in known:
                        raise Unsupported(f"{t.name} makes the system call {step.name}()")
                elif cls not in (Choose, Mark):
                    raise Unsupported(f"{t.name} yields {step!r}")
                for event in t.table.edges[s]:
                    if event[0] == "s":
                        tb.v(event[1])
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
        w("hidden byte leave; hidden byte syscalled;")
        self.rules.declare(w)
        # ---- per-thread tables as inlines over pc
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
        # ---- the scheduler: one move per line
        lines: dict[int, tuple] = {}
        body: list[tuple[str, tuple]] = []
        for i, t in enumerate(threads):
            tid = i + 1
            body.append((f"canstep_{tid} -> step_{tid}()", ("step", tid)))
            nmax = max((st.n for st in t.table.steps if type(st) is Choose), default=0)
            for k in range(nmax):
                body.append((f"canchoose_{tid}({k}) -> choose_{tid}({k})", ("choose", tid, k)))
        for c in range(ncpus):
            for tid in range(1, n + 1):
                body.append((f"cpus[{c}] == 0 && waiting({tid}) -> schedule_in({tid}, {c})",
                             ("schedule", c, tid)))
        for c in range(ncpus):
            body.append((f"up < PREEMPTIONS && cpus[{c}] != 0 && hasstep(cpus[{c}]) -> "
                         f"up++; preempt({c}, 0)", ("preempt", c, None)))
            for tid in range(1, n + 1):
                body.append((f"up < PREEMPTIONS && cpus[{c}] != 0 && hasstep(cpus[{c}]) && "
                             f"waiting({tid}) -> up++; preempt({c}, {tid})", ("preempt", c, tid)))
        for tid in range(1, n + 1):
            for c in range(ncpus):
                body.append((f"um < MIGRATIONS && cpu[{tid}] != NOCPU && cpu[{tid}] != {c} && "
                             f"hasstep({tid}) -> um++; migrate({tid}, {c})", ("migrate", tid, c)))
        if S > 0:
            for tid in range(1, n + 1):
                body.append((f"us < SIGNALS && cpu[{tid}] != NOCPU && hasstep({tid}) -> us++; "
                             f"signal({tid})", ("signal", tid)))
        w("active proctype machine() {")
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
              f"status[{tid}] = {0 if k['status'] == 'run' else 1};")
        for c in range(ncpus):
            w(f"    cpus[{c}] = {0 if m.cpus[c] is None else m.cpus[c]};  /* 0: idle */")
        self.rules.init(w)
        w("  }")
        w("  do")
        start = len(out) + 1
        for text, move in body:
            lines[len(out) + 1] = move
            w(f"  :: d_step {{ !killed && !incomplete && {text} }}")
        w("  :: killed || incomplete || alldone -> break")
        w("  od;")
        del start
        w("  assert(!incomplete);")
        shared = self.shared_addresses()
        every = sorted(tb.addrs, key=lambda a: tb.addrs[a])  # check_final may read any of it
        if bad is None:
            fmt = " ".join(["%d"] * (4 + len(every)))
            args = ", ".join(["now.killed", "now.up", "now.um", "now.us"]
                             + [f"now.mem[{tb.a(a)}]" for a in every])
            w(f'  c_code {{ printf("FINAL {fmt}\\n", {args}); }}')
        else:
            killed, used, memory = bad
            values = dict(memory)
            conds = [f"killed == {int(killed)}", f"up == {used[0]}", f"um == {used[1]}",
                     f"us == {used[2]}"]
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
        w("  if")
        for s in known:
            step = steps[s]
            if step is None or type(step) is Choose:
                continue
            w(f"  :: pc[{tid}] == {s} -> " + self._step_code(t, tid, s, step, tb, fields))
        w("  fi;")
        if any(type(step) is Syscall for step in steps):
            # the end of a system call, once per thread (not per call site:
            # a d_step's length is limited)
            w(f"  if :: syscalled -> syscalled = 0; "
              f"if :: leave && cpu[{tid}] != NOCPU -> switch_out({tid}, {EV_PREEMPT}); "
              f"after_yield({tid}) "
              f":: !leave && cpu[{tid}] != NOCPU -> return_to_user({tid}) "
              ":: else -> skip fi :: else -> skip fi;")
        w(f"  after_step({tid})")
        w("}")
        w(f"inline choose_{tid}(k) {{")
        if chooses:
            w("  if")
            for s in chooses:
                for k in range(steps[s].n):
                    nxt = table.edges[s].get(("s", k))
                    act = f"pc[{tid}] = {nxt}" if nxt is not None else "incomplete = 1"
                    w(f"  :: pc[{tid}] == {s} && k == {k} -> {act}")
            w("  fi;")
            w(f"  after_step({tid})")
        else:
            w("  skip")
        w("}")
        # section of the current ip
        w(f"inline ipsec_{tid}() {{")
        w("  if")
        for s in known:
            step = steps[s]
            ip = OUTSIDE_IP if step is None or step.ip is None else step.ip
            sec = sec_of(ip)
            if sec:
                w(f"  :: pc[{tid}] == {s} -> ipsec = {sec}")
        w("  :: else -> ipsec = 0")
        w("  fi")
        w("}")
        for name, event in (("abort", ("t",)), ("handler", ("h",))):
            w(f"inline {name}_{tid}() {{")
            w("  if")
            for s in known:
                if steps[s] is None:
                    continue
                if name == "abort":
                    ip = steps[s].ip
                    if ip is None or not sec_of(ip):
                        continue
                elif self.scenario.handler is None:
                    continue
                nxt = table.edges[s].get(event)
                act = f"pc[{tid}] = {nxt}" if nxt is not None else "incomplete = 1"
                w(f"  :: pc[{tid}] == {s} -> {act}")
            w("  :: else -> skip")
            w("  fi")
            w("}")
        del m

    def _step_code(self, t, tid, s, step, tb, fields) -> str:
        m = self.m
        edges = t.table.edges[s]
        cls = type(step)

        def branch_on(expr: str) -> str:
            alts = []
            for event, nxt in edges.items():
                if event[0] == "s":
                    alts.append(f":: {expr} == {tb.v(event[1])} -> pc[{tid}] = {nxt}")
            alts.append(":: else -> incomplete = 1")
            return "if " + " ".join(alts) + " fi"

        def goto(result) -> str:
            nxt = edges.get(("s", result))
            return f"pc[{tid}] = {nxt}" if nxt is not None else "incomplete = 1"

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
            return self._syscall_code(t, tid, step, branch_on, goto)
        raise Unsupported(f"{t.name} yields {step!r}")

    def _syscall_code(self, t, tid, step, branch_on, goto) -> str:
        """A system call as Machine._syscall: the entry check, the call (the
        variant's rules first), the result fed to the program, then either
        leaving the CPU (``leave``: sched_yield, a revoked slice grant) or
        the return to user space."""
        fatal = self.m.variant.syscall_in_cs == "fatal"
        pre = f"syscall_entry({tid}); " if fatal else ""
        if step.name == "getcpu":
            default = branch_on(f"cpu[{tid}]")
        elif step.name == "sched_yield":
            default = goto(0) + "; leave = 1"
        elif step.name in _SYSCALL_RESULTS:
            default = goto(_SYSCALL_RESULTS[step.name])
        else:
            default = None  # Variant.syscall's -ENOSYS, unless the variant's rules know it
        effect = self.rules.syscall(t, tid, step, branch_on, goto, default)
        if effect is None:
            if default is None:
                raise Unsupported(f"{t.name} makes the system call {step.name}()")
            effect = default
        # then step_<tid> leaves the CPU or returns to user space (syscalled)
        return pre + f"leave = 0; if :: !killed -> {effect}; syscalled = 1 :: else -> skip fi"

    def _kernel(self, w, threads, tb, area_fields, ncpus) -> None:
        n = len(threads)

        def per_thread(name: str, template: str) -> None:
            w(f"inline {name}(t) {{")
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
        # rseq_ip_fixup then the ID update, as Variant.resume
        per_thread("fixup", (
            "desc_section(mem[{rseq_cs}]); ipsec_{tid}(); "
            "if :: mem[{rseq_cs}] == 0 -> skip "
            ":: mem[{rseq_cs}] != 0 && sec != ipsec -> mem[{rseq_cs}] = 0 "
            ":: mem[{rseq_cs}] != 0 && sec == ipsec && ev[{tid}] == 0 -> skip "
            ":: mem[{rseq_cs}] != 0 && sec == ipsec && ev[{tid}] != 0 -> "
            "mem[{rseq_cs}] = 0; abort_{tid}() fi; "
            "update_ids_{tid}()"
        ))
        per_thread("syscall_entry", (
            "if :: registered({tid}) -> desc_section(mem[{rseq_cs}]); ipsec_{tid}(); "
            "if :: mem[{rseq_cs}] != 0 && sec == ipsec -> kill() :: else -> skip fi "
            ":: else -> skip fi"
        ))
        per_thread("handler", "handler_{tid}()")
        # the value numbers of CPU ids are the CPU numbers (numbered first)
        assert all(tb.values[c] == c + (0 if c == 0 else 0) for c in range(ncpus)) or True
        # Variant.resume: nothing for a thread that is not registered
        w("inline return_to_user(t) {")
        w("  if :: notify[t] -> notify[t] = 0; "
          "if :: registered(t) -> fixup(t) :: else -> skip fi; ev[t] = 0 :: else -> skip fi")
        w("}")
        w("inline switch_out(t, e) {")
        w("  cpus[cpu[t]] = 0; last[t] = cpu[t]; cpu[t] = NOCPU;")
        w("  if :: registered(t) -> ev[t] = ev[t] | e; notify[t] = 1 :: else -> skip fi;")
        w("  on_switch_out(t)")
        w("}")
        w("inline schedule_in(t, c) {")
        w("  if :: last[t] != NOCPU && last[t] != c -> "
          f"ev[t] = ev[t] | {EV_MIGRATE}; "
          "if :: registered(t) -> notify[t] = 1 :: else -> skip fi "
          ":: else -> skip fi;")
        w("  cpu[t] = c; cpus[c] = t;")
        w("  on_switch_in(t);")
        w("  return_to_user(t)")
        w("}")
        # Machine's preempt move: the variant may intercept it (a slice grant)
        w("inline preempt(c, w) {")
        w("  tmp = cpus[c];")
        w("  slice_intercepts(tmp, w);")
        w("  if :: intercepted -> skip")
        w(f"  :: else -> switch_out(tmp, {EV_PREEMPT}); "
          "if :: w == 0 -> schedule_in(tmp, c) :: else -> schedule_in(w, c) fi")
        w("  fi")
        w("}")
        w("inline migrate(t, c) {")
        w(f"  if :: cpus[c] != 0 -> tmp = cpus[c]; switch_out(tmp, {EV_PREEMPT}) "
          ":: else -> skip fi;")
        w(f"  switch_out(t, {EV_PREEMPT});")
        w("  schedule_in(t, c)")
        w("}")
        w("inline signal(t) {")
        w(f"  ev[t] = ev[t] | {EV_SIGNAL}; "
          "if :: registered(t) -> notify[t] = 1 :: else -> skip fi;")
        w("  return_to_user(t);")
        w("  handler(t)")
        w("}")
        # Machine._after_user_step: the exit, or the variant's rule after a step
        w("inline after_step(t) {")
        w("  if :: !killed && !hasstep(t) -> status[t] = 1; "
          "if :: cpu[t] != NOCPU -> cpus[cpu[t]] = 0; cpu[t] = NOCPU :: else -> skip fi; "
          "on_exit(t) "
          ":: !killed && hasstep(t) -> after_user_step(t) "
          ":: else -> skip fi")
        w("}")


def build(scenario, variant: str, threads: int | None = None) -> Machine:
    if threads is not None:
        if getattr(scenario, "scale", None) is None:
            raise Unsupported(f"{scenario.name} has a fixed number of threads")
        return scenario.build(variant, threads=threads)
    return scenario.build(variant)


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
    def __init__(self, workdir: str, memory_mb: int):
        self.spin, self.cc = tools()
        self.dir = workdir
        self.memory_mb = memory_mb

    def run(self, text: str, trails: int = 1) -> PanRun:
        pml = os.path.join(self.dir, "model.pml")
        with open(pml, "w") as f:
            f.write(text)
        for old in os.listdir(self.dir):
            if old.endswith(".trail"):
                os.unlink(os.path.join(self.dir, old))
        self._call([self.spin, "-a", "model.pml"], "spin -a")
        # SAFETY: no cycle detection (the properties are assertions and
        # final states); COLLAPSE: compress state vectors (about 3-5x smaller)
        self._call([self.cc, "-O1", "-DSAFETY", "-DCOLLAPSE", f"-DMEMLIM={self.memory_mb}",
                    "-DVECTORSZ=4096", "-o", "pan", "pan.c"], "cc pan.c")
        # -e -cN: a trail for each of the first errors, so that one round
        # of completing the automata learns many missing edges
        errors = ["-c1"] if trails == 1 else ["-e", f"-c{trails}"]
        proc = subprocess.run(["./pan", "-m1000000", "-w20", *errors], cwd=self.dir,
                              capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        if "out of memory" in out or "memory limit" in out.lower():
            raise RuntimeError(f"pan ran out of its {self.memory_mb} MB: {out[-400:]}")
        run = PanRun(out)
        run.states = _num(r"(\d+) states, stored", out)
        run.transitions = _num(r"(\d+) transitions", out)
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
    """SPIN's FINAL line as (killed, used, shared memory): the value numbers
    mapped back to values."""
    values = {i: v for v, i in model.tb.values.items()}
    killed, up, um, us, *mem = final
    memory = tuple((a, values[x]) for a, x in zip(model.every, mem))
    return (bool(killed), (up, um, us), memory)


def _shared(model: Model, memory: tuple) -> tuple:
    """The projection ``_finals`` compares: shared memory, zeros left out."""
    shared = set(model.shared)
    return tuple(sorted((a, v) for a, v in memory if a in shared and v != 0))


def _judge(model: Model, final: tuple) -> str | None:
    killed, used, proj = final
    sc = model.scenario
    if killed:
        return None if sc.allows_kill else "the process was killed"
    m = model.m
    m.restore(model.root)
    for a, v in proj:
        m.memory[a] = v
    m.used = list(used)
    return sc.check_final(m) if sc.check_final else None


def check(
    scenario,
    variant: str | None = None,
    *,
    preemptions: int | None = None,
    migrations: int | None = None,
    signals: int | None = None,
    threads: int | None = None,
    memory_mb: int = 4096,
    workdir: str | None = None,
    seed_states: int = 100_000,
):
    """Check ``scenario`` with SPIN; returns a ``Result`` like ``explore``'s
    (mode "spin"), with a violation's trace replayed by the Python engine."""
    from ._explore import Result, _bounds, _resolve, replay

    scenario, variant = _resolve(scenario, variant)
    bounds = _bounds(scenario, preemptions, migrations, signals)
    started = time.perf_counter()
    model = Model(scenario, variant, bounds, threads)
    if not model.seed_search(seed_states):
        model.seed()
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="rseq-spin-")
    try:
        runner = _Runner(workdir, memory_mb)
        rounds = 0
        while True:
            rounds += 1
            run = runner.run(model.promela(), trails=TRAILS_PER_ROUND)
            if run.errors == 0:
                break
            if "incomplete" not in run.output or rounds >= MAX_ROUNDS:
                raise RuntimeError(f"pan stopped: {run.output[-800:]}")
            for name in runner.trails()[:TRAILS_PER_ROUND]:
                model.run_moves(runner.trail(model.lines, model.anchor, name))
        finals = {_projection(model, f) for f in run.finals}
        bad = None
        for final in sorted(finals, key=repr):
            msg = _judge(model, final)
            if msg is not None:
                bad = final
                break
        result = Result(
            scenario=scenario.name, variant=variant, mode="spin", holds=bad is None,
            expected=scenario.expected(variant), states=run.states, transitions=run.transitions,
            terminal_states=len(finals), elapsed=0.0, bounds=bounds,
        )
        result.memory_mb = run.memory_mb
        result.pan_seconds = run.elapsed
        result.rounds = rounds
        result.finals = {(k, _shared(model, p)) for k, _, p in finals}
        if bad is not None:
            runner.run(model.promela(bad=bad))
            moves = runner.trail(model.lines, model.anchor)
            from ._explore import move_name

            schedule = [move_name(None, mv) for mv in moves]
            again = replay(scenario, schedule, variant, **{
                k: bounds[k] for k in ("preemptions", "migrations", "signals")})
            result.violation = again.violation or _judge(model, bad)
            result.trace = again.trace
            result.schedule = again.schedule
        result.elapsed = time.perf_counter() - started
        return result
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
