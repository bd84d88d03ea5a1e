"""The scenarios shipped with the explorer: small user-space algorithms and
registration protocols, each with the property it must keep, in pairs of a
broken and a correct design where one exists.

Programs keep all their state in locals (while loops, no hidden iterators),
so the explorer can hash it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _abi
from ._machine import TLS_BASE, Machine
from ._program import (
    Abort,
    Cas,
    Choose,
    Context,
    Load,
    Mark,
    Store,
    Syscall,
    _enter,
    current_cpu,
    load_add_store,
    load_cbeq_store_add_load_store,
    load_cbne_store,
    rseq_register,
    rseq_unregister,
)
from ._variants import VARIANTS

SIG = _abi.SIGNATURE_X86
LINUX = ("linux-4.18", "linux-6.3", "linux-7.0")
ALL = tuple(VARIANTS)


@dataclass(frozen=True)
class ThreadSpec:
    program: Callable
    cpu: int | None = 0  # initial CPU, or None: waiting to be scheduled


@dataclass
class Scenario:
    name: str
    title: str
    doc: str
    expect: str  # "holds" or "violated" under the default variant
    setup: Callable[[Machine], dict]
    threads: Callable[[dict], list[ThreadSpec]]
    check_step: Callable | None = None
    check_final: Callable | None = None
    variants: tuple = ALL
    default_variant: str = "linux-6.3"
    expect_by_variant: dict = field(default_factory=dict)
    pair: str | None = None
    ncpus: int = 2
    preregister: bool = True
    register_flags: Callable[[Context], tuple] | None = None  # -> (flags, extra args)
    area_size: int | None = None
    area_region: int = 64
    handler: Callable | None = None
    variant_options: dict = field(default_factory=dict)
    allows_kill: bool = False
    bounds: dict = field(default_factory=lambda: {"preemptions": 2, "migrations": 1, "signals": 0})
    extra_sections: dict = field(default_factory=dict)

    def expected(self, variant: str) -> str:
        return self.expect_by_variant.get(variant, self.expect)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "expect": self.expect,
            "expect_by_variant": dict(self.expect_by_variant),
            "default_variant": self.default_variant,
            "variants": list(self.variants),
            "pair": self.pair,
            "bounds": dict(self.bounds),
        }

    def build(self, variant_name: str | None = None) -> Machine:
        variant = VARIANTS[variant_name or self.default_variant]
        if self.variant_options:
            variant = variant.with_options(**self.variant_options)
        m = Machine(variant, self.ncpus)
        sections = m.define_sections(SIG, self.extra_sections)
        data = self.setup(m)
        specs = self.threads(data)
        length = self.area_size or variant.default_length
        offsets = tuple(sorted(variant.offsets.items()))
        for i, spec in enumerate(specs):
            tid = i + 1
            area = data.get(f"area{tid}")
            if area is None:
                area = TLS_BASE + tid * 0x1000
                m.map(f"T{tid}.rseq", area, max(self.area_region, length), "rw")
            for fname, off in variant.offsets.items():
                m.name(area + off, f"T{tid}.{fname}")
            ctx = Context(
                tid=tid,
                area=area,
                offsets=offsets,
                sections=tuple(sorted(sections.items())),
                signature=SIG,
                area_size=length,
                data=tuple(sorted(data.items())),
                query_offsets=variant.query_offsets,
            )
            t = m.add_thread(f"T{tid}", spec.program, ctx)
            t.handler = self.handler
            variant.thread_created(m, t)
            if self.preregister:
                flags, extra = self.register_flags(ctx) if self.register_flags else (0, ())
                if variant.kernel_owned_area:
                    result = variant.sys_rseq(m, t, 0, 0, 0, SIG)
                else:
                    result = variant.sys_rseq(m, t, area, length, flags, SIG, *extra)
                if result != 0:
                    raise RuntimeError(f"{self.name}: registration under {variant.name} failed: {result}")
            t.start()
        for t in m.threads:
            prefix = f"{t.name}."
            t.private = tuple((r.start, r.end) for r in m.regions if r.name.startswith(prefix))
        for t, spec in zip(m.threads, specs):
            if spec.cpu is not None:
                m.schedule_in(t, spec.cpu)
        m.kernel_writes = []
        return m


SCENARIOS: dict[str, Scenario] = {}


def _add(s: Scenario) -> Scenario:
    SCENARIOS[s.name] = s
    return s


# ====================================================================== counter


def _counter_setup(m: Machine) -> dict:
    counters = m.alloc("counter", 8 * m.ncpus, align=64)
    for cpu in range(m.ncpus):
        m.name(counters + 8 * cpu, f"counter[cpu{cpu}]")
    return {"counters": counters, "adds": 2}


def percpu_add(ctx: Context):
    """rseq per-CPU add, retried on abort: the librseq idiom."""
    counters = ctx.get("counters")
    done = 0
    while done < ctx.get("adds"):
        cpu = yield from current_cpu(ctx)
        ret = yield from load_add_store(ctx, counters + 8 * cpu, 1, cpu)
        if ret == 0:
            done += 1


def percpu_add_plain(ctx: Context):
    """The same add without a critical section: load, add, store."""
    counters = ctx.get("counters")
    done = 0
    while done < ctx.get("adds"):
        cpu = yield from current_cpu(ctx)
        value = yield Load(counters + 8 * cpu, size=8)
        yield Store(counters + 8 * cpu, value + 1, size=8)
        done += 1


def counter_signal_handler(ctx: Context):
    """A handler that adds 1 to the per-CPU counter with rseq."""
    counters = ctx.get("counters")
    while True:
        cpu = yield from current_cpu(ctx)
        ret = yield from load_add_store(ctx, counters + 8 * cpu, 1, cpu)
        if ret == 0:
            return


def _counter_final(m: Machine) -> str | None:
    counters = m.threads[0].ctx.get("counters")
    adds = m.threads[0].ctx.get("adds")
    values = [m.read(counters + 8 * cpu) for cpu in range(m.ncpus)]
    expected = adds * len(m.threads) + (m.used[2] if m.threads[0].handler else 0)
    if sum(values) != expected:
        return f"lost update: the per-CPU counters {values} sum to {sum(values)}, expected {expected}"
    return None


def _three_on_two(program):
    return lambda data: [ThreadSpec(program, 0), ThreadSpec(program, 1), ThreadSpec(program, None)]


_add(
    Scenario(
        name="counter",
        title="per-CPU counter add with load_add_store",
        doc="Three threads on two CPUs each add 1 twice to counter[cpu] with the rseq "
        "primitive load_add_store, retrying on -1; a signal handler adds 1 too. Property: "
        "the counters sum to the number of adds. Holds: a preemption, migration or "
        "signal between the cpu_id check and the commit aborts the section.",
        expect="holds",
        setup=_counter_setup,
        threads=_three_on_two(percpu_add),
        check_final=_counter_final,
        handler=counter_signal_handler,
        bounds={"preemptions": 2, "migrations": 0, "signals": 0},
        pair="counter-plain",
    )
)

_add(
    Scenario(
        name="counter-plain",
        title="per-CPU counter add without rseq (broken)",
        doc="The same counter with a plain load, add, store on the CPU read from cpu_id_start. "
        "A preemption between the load and the store lets another thread on the same CPU "
        "update the counter, and one update is lost.",
        expect="violated",
        setup=_counter_setup,
        threads=_three_on_two(percpu_add_plain),
        check_final=_counter_final,
        bounds={"preemptions": 2, "migrations": 0, "signals": 0},
        pair="counter",
    )
)

# ====================================================================== list pop

NEXT = 0  # offset of the next pointer in a node


def _list_setup(m: Machine) -> dict:
    heads = m.alloc("head", 8 * m.ncpus, align=64)
    for cpu in range(m.ncpus):
        m.name(heads + 8 * cpu, f"head[cpu{cpu}]")
    nodes = []
    for name in "ABC":
        node = m.alloc(f"node{name}", 16)
        m.name(node + NEXT, f"node{name}.next")
        nodes.append(node)
    # list on cpu0: A -> B -> C
    m.memory[heads] = nodes[0]
    m.memory[nodes[0] + NEXT] = nodes[1]
    m.memory[nodes[1] + NEXT] = nodes[2]
    m.memory[nodes[2] + NEXT] = 0
    data = {"heads": heads, "nodes": tuple(nodes)}
    for tid in (1, 2):
        for slot in range(2):
            addr = m.alloc(f"T{tid}.owned{slot}", 8)
            data[f"owned{tid}_{slot}"] = addr
        data[f"scratch{tid}"] = m.alloc(f"T{tid}.popped", 8)
    return data


def rseq_pop(ctx: Context):
    """Pop from this CPU's list with load_cbeq_store_add_load_store."""
    heads = ctx.get("heads")
    scratch = ctx.get(f"scratch{ctx.tid}")
    while True:
        cpu = yield from current_cpu(ctx)
        ret = yield from load_cbeq_store_add_load_store(ctx, heads + 8 * cpu, 0, NEXT, scratch, cpu)
        if ret == 0:
            node = yield Load(scratch, size=8)
            return node
        if ret == 1:
            return 0


def rseq_push(ctx: Context, node: int):
    """Push onto this CPU's list: link, then load_cbne_store the head."""
    heads = ctx.get("heads")
    while True:
        cpu = yield from current_cpu(ctx)
        head = yield Load(heads + 8 * cpu, size=8)
        yield Store(node + NEXT, head, size=8)
        ret = yield from load_cbne_store(ctx, heads + 8 * cpu, head, node, cpu)
        if ret == 0:
            return


def cas_pop(ctx: Context):
    """Treiber-stack pop with compare-and-swap on this CPU's head."""
    heads = ctx.get("heads")
    while True:
        cpu = yield from current_cpu(ctx)
        head = yield Load(heads + 8 * cpu, size=8)
        if head == 0:
            return 0
        nxt = yield Load(head + NEXT, size=8)
        old = yield Cas(heads + 8 * cpu, head, nxt)
        if old == head:
            return head


def cas_push(ctx: Context, node: int):
    heads = ctx.get("heads")
    while True:
        cpu = yield from current_cpu(ctx)
        head = yield Load(heads + 8 * cpu, size=8)
        yield Store(node + NEXT, head, size=8)
        old = yield Cas(heads + 8 * cpu, head, node)
        if old == head:
            return


def _popper(pop):
    def program(ctx: Context):
        node = yield from pop(ctx)
        yield Store(ctx.get(f"owned{ctx.tid}_0"), node, size=8)

    program.__name__ = f"pop_one_{pop.__name__}"
    return program


def _aba_maker(pop, push):
    def program(ctx: Context):
        # pop A, pop B, give A back: head is A again, but A.next is now C
        first = yield from pop(ctx)
        yield Store(ctx.get(f"owned{ctx.tid}_0"), first, size=8)
        second = yield from pop(ctx)
        yield Store(ctx.get(f"owned{ctx.tid}_1"), second, size=8)
        if first:
            yield Store(ctx.get(f"owned{ctx.tid}_0"), 0, size=8)
            yield from push(ctx, first)

    program.__name__ = f"aba_{pop.__name__}"
    return program


def _list_final(m: Machine) -> str | None:
    ctx = m.threads[0].ctx
    nodes = ctx.get("nodes")
    names = {n: m.region_of(n).name for n in nodes}
    seen: dict[int, list[str]] = {n: [] for n in nodes}
    for cpu in range(m.ncpus):
        node = m.read(ctx.get("heads") + 8 * cpu)
        hops = 0
        while node and hops <= len(nodes):
            if node not in seen:
                return f"head[cpu{cpu}] list reaches {node:#x}, which is not a node"
            seen[node].append(f"list[cpu{cpu}]")
            node = m.read(node + NEXT)
            hops += 1
        if node:
            return f"the list of cpu{cpu} has a cycle"
    for tid in (1, 2):
        for slot in range(2):
            node = m.read(ctx.get(f"owned{tid}_{slot}"))
            if node:
                seen[node].append(f"T{tid}")
    for node, holders in seen.items():
        if len(holders) != 1:
            where = " and ".join(holders) if holders else "nowhere"
            return f"{names[node]} is held by {where}: the list is corrupt (ABA)"
    return None


def _list_threads(pop, push):
    return lambda data: [ThreadSpec(_popper(pop), 0), ThreadSpec(_aba_maker(pop, push), None)]


_add(
    Scenario(
        name="list-pop-rseq",
        title="per-CPU list pop with load_cbeq_store_add_load_store",
        doc="cpu0's list is A -> B -> C. T1 pops one node; T2 pops two and pushes the first "
        "back. Property: at the end every node is in exactly one list or held by exactly "
        "one thread. Holds: the head, the next pointer and the commit are one critical "
        "section, so T2 cannot run on that CPU in between without aborting T1.",
        expect="holds",
        setup=_list_setup,
        threads=_list_threads(rseq_pop, rseq_push),
        check_final=_list_final,
        pair="list-pop-cas",
    )
)

_add(
    Scenario(
        name="list-pop-cas",
        title="per-CPU list pop with a plain compare-and-swap (broken: ABA)",
        doc="The same lists popped with load head, load head->next, CAS(head, head, next). "
        "If T1 is preempted after reading head A and next B, and T2 pops A, pops B and pushes "
        "A back, T1's CAS still succeeds and installs B, which T2 holds.",
        expect="violated",
        setup=_list_setup,
        threads=_list_threads(cas_pop, cas_push),
        check_final=_list_final,
        pair="list-pop-rseq",
    )
)

# ====================================================================== two libraries


def _libs_setup(m: Machine) -> dict:
    counter = m.alloc("counter", 8 * m.ncpus, align=64)
    for cpu in range(m.ncpus):
        m.name(counter + 8 * cpu, f"counter[cpu{cpu}]")
    return {"counters": counter}


def _lib_init(ctx: Context, lib: str, refcount: bool):
    yield Mark("init", lib)
    if refcount:
        rc_addr = ctx.area + _abi.ORIG_SIZE  # after struct rseq, as seed 002
        rc = yield Load(rc_addr)
        yield Store(rc_addr, rc + 1)
        if rc == 0:
            yield from rseq_register(ctx)
    else:
        # EBUSY means someone registered first: piggy-back on it
        yield from rseq_register(ctx)


def _lib_fini(ctx: Context, lib: str, refcount: bool):
    yield Mark("fini", lib)
    if refcount:
        rc_addr = ctx.area + _abi.ORIG_SIZE
        rc = yield Load(rc_addr)
        yield Store(rc_addr, rc - 1)
        if rc == 1:
            yield from rseq_unregister(ctx)
    else:
        yield from rseq_unregister(ctx)


def _lib_use(ctx: Context, lib: str):
    yield Mark("use", lib)
    counters = ctx.get("counters")
    cpu_id = yield Load(ctx.field("cpu_id"))
    if cpu_id >= 0x80000000:
        return  # cpu_id says unregistered: a library falls back to its slow path
    while True:
        cpu = yield from current_cpu(ctx)
        ret = yield from load_add_store(ctx, counters + 8 * cpu, 1, cpu)
        if ret == 0:
            return


def _two_libraries(refcount: bool):
    def program(ctx: Context):
        # Each library runs init, use, fini; the explorer picks the order in
        # which the two libraries' calls interleave on this one thread.
        a = 0
        b = 0
        while a < 3 or b < 3:
            if a < 3 and b < 3:
                pick = yield Choose(2, "libA or libB calls next")
            else:
                pick = 0 if a < 3 else 1
            phase = a if pick == 0 else b
            lib = "libA" if pick == 0 else "libB"
            if phase == 0:
                yield from _lib_init(ctx, lib, refcount)
            elif phase == 1:
                yield from _lib_use(ctx, lib)
            else:
                yield from _lib_fini(ctx, lib, refcount)
            if pick == 0:
                a += 1
            else:
                b += 1

    return program


def _libs_check(m: Machine, info) -> str | None:
    if info is None:
        return None
    t, step, result = info
    if type(step) is Mark:
        if step.label == "fini":
            m.ghost["fini"] = step.arg
        elif step.label == "use" and t.k["rseq"] is None:
            culprit = m.ghost.get("fini")
            by = f" after {culprit} unregistered it" if culprit and culprit != step.arg else ""
            return (
                f"{step.arg} uses rseq while {t.name}'s area is not registered{by} "
                "(use-after-unregister, seed 002)"
            )
    return None


for _refcount in (False, True):
    _add(
        Scenario(
            name="two-libs-refcount" if _refcount else "two-libs-no-refcount",
            title="two libraries sharing a thread's registration"
            + (" with a user-space reference count" if _refcount else " without a reference count (broken)"),
            doc=(
                "libA and libB each init (register), use (a per-CPU add) and fini (unregister) on "
                "one thread, in every interleaving of their calls. Property: rseq is only used "
                "while the thread is registered. "
                + (
                    "Holds: a count after struct rseq (seed 002) makes the first init register "
                    "and the last fini unregister."
                    if _refcount
                    else "Violated: libB's fini unregisters the area libA still uses."
                )
            ),
            expect="holds" if _refcount else "violated",
            setup=_libs_setup,
            threads=(lambda rc: lambda data: [ThreadSpec(_two_libraries(rc), 0)])(_refcount),
            check_step=_libs_check,
            variants=LINUX + ("freebsd-2021", "sched-state-2023"),
            preregister=False,
            ncpus=1,
            bounds={"preemptions": 1, "migrations": 0, "signals": 0},
            pair="two-libs-no-refcount" if _refcount else "two-libs-refcount",
        )
    )

# ====================================================================== interposed area


def _interposed_setup(m: Machine) -> dict:
    # A preloaded library's __rseq_abi: the original 32 bytes, flags 0 (it
    # predates the size flag), and the next TLS variable right after it.
    area = TLS_BASE + 0x1000
    m.map("T1.__rseq_abi", area, _abi.ORIG_SIZE, "rw")
    m.map("T1.neighbour", area + _abi.ORIG_SIZE, 16, "rw")
    m.memory[area + _abi.ORIG_SIZE] = 0x5A5A5A5A
    m.memory[area + _abi.OFF_CPU_ID] = _abi.CPU_ID_UNINITIALIZED
    return {"area1": area, "neighbour": area + _abi.ORIG_SIZE}


def new_registrant(ctx: Context):
    """A registration owner built against the 40-byte struct rseq: it passes
    its own sizeof, unaware the symbol was interposed by a 32-byte one."""
    result = yield from rseq_register(ctx, length=_abi.SF_KERNEL_SIZE)
    if result != 0:
        return
    flags = yield Load(ctx.area + _abi.OFF_FLAGS)
    size = _abi.ORIG_SIZE
    if flags & _abi.SIZE_FLAG:
        size = yield Load(ctx.area + _abi.SF_OFF_KERNEL_SIZE)
    if size >= _abi.SF_OFF_NODE_ID + 4:
        yield Load(ctx.area + _abi.SF_OFF_NODE_ID)
    else:
        yield Syscall("getcpu")  # node_id not usable: the slow path
    yield from current_cpu(ctx)


def _interposed_check(m: Machine, info) -> str | None:
    neighbour = m.threads[0].ctx.get("neighbour")
    for addr, _size, fname, _tid in m.kernel_writes:
        if neighbour <= addr < neighbour + 16:
            return (
                f"the kernel wrote {fname} at __rseq_abi+{addr - neighbour + _abi.ORIG_SIZE}, past the "
                f"{_abi.ORIG_SIZE}-byte area the interposing library defined, into T1.neighbour"
            )
    return None


for _negotiate in (False, True):
    _add(
        Scenario(
            name="interposed-size-flag" if _negotiate else "interposed-trusts-length",
            title="an interposed smaller __rseq_abi"
            + (" with seed 000's size negotiation" if _negotiate else " and a kernel that trusts rseq_len (broken)"),
            doc=(
                "A preloaded library defines a 32-byte __rseq_abi; the registration owner was built "
                "with a 40-byte struct rseq and registers its own sizeof. Property: the kernel never "
                "writes outside the 32 bytes. "
                + (
                    "Holds: the kernel takes the size from the definition (flag bit and user_size), "
                    "and without the flag uses only the original 32 bytes."
                    if _negotiate
                    else "Violated: the kernel writes node_id at offset 32, into the next variable."
                )
            ),
            expect="holds" if _negotiate else "violated",
            setup=_interposed_setup,
            threads=lambda data: [ThreadSpec(new_registrant, 0)],
            check_step=_interposed_check,
            variants=("size-flag-2020",),
            default_variant="size-flag-2020",
            variant_options={"negotiate": _negotiate},
            preregister=False,
            ncpus=2,
            bounds={"preemptions": 1, "migrations": 1, "signals": 0},
            pair="interposed-trusts-length" if _negotiate else "interposed-size-flag",
        )
    )

# ====================================================================== adaptive mutex

SHARED_STRIDE = 64


def _mutex_setup(m: Machine) -> dict:
    lock = m.alloc("lock", 8, align=64)
    counter = m.alloc("protected", 8)
    shared = m.alloc("rseq_shared", SHARED_STRIDE * 4, align=64)
    for tid in range(1, 4):
        m.name(shared + SHARED_STRIDE * tid, f"T{tid}.sched_state")
    return {"lock": lock, "protected": counter, "shared": shared, "rounds": 1}


def _mutex_register(ctx: Context):
    return _abi.FLAG_SHARED, (ctx.get("shared") + SHARED_STRIDE * ctx.tid,)


def _lock(ctx: Context, adaptive: bool):
    lock = ctx.get("lock")
    while True:
        owner = yield Cas(lock, 0, ctx.tid)
        if owner == 0:
            return
        if adaptive:
            # seed 001: read the owner's sched_state; spin only while it runs
            state = yield Load(ctx.get("shared") + SHARED_STRIDE * owner)
            if state & _abi.SCHED_STATE_ON_CPU:
                yield Mark("spin", owner)
            else:
                yield Syscall("sched_yield")
        else:
            yield Mark("spin", owner)


def _locker(adaptive: bool):
    def program(ctx: Context):
        rounds = 0
        while rounds < ctx.get("rounds"):
            yield from _lock(ctx, adaptive)
            yield Mark("enter")
            value = yield Load(ctx.get("protected"), size=8)
            yield Store(ctx.get("protected"), value + 1, size=8)
            yield Mark("leave")
            yield Store(ctx.get("lock"), 0, size=8)
            rounds += 1

    return program


def bystander(ctx: Context):
    """Another thread of the process that only needs a CPU for a while."""
    yield Syscall("getpid")
    yield Syscall("getpid")


def _mutex_check(m: Machine, info) -> str | None:
    if info is None:
        # a scheduler move: a waiter may spin again once the owner has run
        for key, owner in list(m.ghost.items()):
            if key[0] == "offcpu-spin" and m.thread(owner).k["cpu"] is not None:
                del m.ghost[key]
        return None
    t, step, result = info
    if type(step) is not Mark:
        return None
    if step.label == "enter":
        inside = m.ghost.get("inside")
        if inside is not None:
            return f"mutual exclusion broken: {t.name} entered while T{inside} is inside"
        m.ghost["inside"] = t.tid
    elif step.label == "leave":
        m.ghost.pop("inside", None)
    elif step.label == "spin":
        owner = m.thread(step.arg)
        key = ("offcpu-spin", t.tid)
        if owner.k["cpu"] is None:
            if m.ghost.get(key) == owner.tid:
                return f"{t.name} spins again while the lock owner {owner.name} is still off CPU"
            m.ghost[key] = owner.tid
        else:
            m.ghost.pop(key, None)
    return None


def _mutex_final(m: Machine) -> str | None:
    value = m.read(m.threads[0].ctx.get("protected"))
    if value != 2:
        return f"the protected counter is {value}, expected 2"
    return None


for _adaptive in (True, False):
    _add(
        Scenario(
            name="adaptive-mutex" if _adaptive else "spin-mutex",
            title="adaptive mutex on seed 001's sched_state"
            if _adaptive
            else "spin-only mutex that ignores sched_state (broken)",
            doc=(
                "T1 and T2 take a lock (compare-and-swap of the owner's tid) around an update; "
                "T3 competes for the CPUs. Properties: mutual exclusion, and a waiter does not "
                "spin twice while the owner stays off CPU. "
                + (
                    "Holds: the waiter reads the owner's sched_state and yields when it is off CPU."
                    if _adaptive
                    else "Violated: the waiter keeps spinning while the owner is preempted."
                )
            ),
            expect="holds" if _adaptive else "violated",
            setup=_mutex_setup,
            threads=(lambda ad: lambda data: [
                ThreadSpec(_locker(ad), 0),
                ThreadSpec(_locker(ad), 1),
                ThreadSpec(bystander, None),
            ])(_adaptive),
            check_step=_mutex_check,
            check_final=_mutex_final,
            variants=("sched-state-2023",),
            default_variant="sched-state-2023",
            register_flags=_mutex_register,
            bounds={"preemptions": 2, "migrations": 0, "signals": 0},
            pair="spin-mutex" if _adaptive else "adaptive-mutex",
        )
    )

# ====================================================================== time slice


def _slice_setup(m: Machine) -> dict:
    counter = m.alloc("protected", 8)
    return {"protected": counter}


def slice_user(ctx: Context):
    """Two short sections under a slice-extension request; the second one
    makes a system call, which must revoke any grant."""
    yield Syscall("prctl", (_abi.PR_RSEQ_SLICE_EXTENSION, _abi.PR_RSEQ_SLICE_EXTENSION_SET, _abi.PR_RSEQ_SLICE_EXT_ENABLE))
    request = ctx.field("slice_request")
    granted = ctx.field("slice_granted")
    n = 0
    while n < 2:
        yield Store(request, 1, size=1)
        yield Mark("section", n)
        value = yield Load(ctx.get("protected"), size=8)
        if n == 1:
            yield Syscall("getpid")
        yield Store(ctx.get("protected"), value + 1, size=8)
        yield Store(request, 0, size=1)
        was_granted = yield Load(granted, size=1)
        if was_granted:
            yield Syscall("rseq_slice_yield")
        n += 1


def _slice_check(m: Machine, info) -> str | None:
    variant = m.variant
    for t in m.threads:
        if t.k["rseq"] is None:
            continue
        granted = m.read(t.k["rseq"][0] + 29)
        key = ("granted-steps", t.tid)
        if info is not None and info[0] is t and granted:
            m.ghost[key] = m.ghost.get(key, 0) + 1
            if m.ghost[key] > variant.slice_steps:
                return f"{t.name}'s grant outlived its bound of {variant.slice_steps} steps"
        elif not granted:
            m.ghost.pop(key, None)
    if info is not None:
        t, step, result = info
        if type(step) is Syscall and step.name != "prctl" and t.k["rseq"] is not None:
            if m.read(t.k["rseq"][0] + 29):
                return f"{t.name} still holds a grant after the system call {step.name}()"
    return None


for _revoke in (True, False):
    _add(
        Scenario(
            name="time-slice" if _revoke else "time-slice-unrevoked",
            title="a critical section under the 7.0 time-slice extension"
            if _revoke
            else "the time-slice extension in a kernel that keeps grants across system calls (broken)",
            doc="T1 sets slice_ctrl.request around two short sections (the second makes a system "
            "call) and calls rseq_slice_yield() when it was granted; T2 waits for the only CPU. "
            "Properties: a grant is revoked by any system call, and never lasts longer than its bound. "
            + ("Holds under linux-7.0." if _revoke else "Violated: the grant survives getpid()."),
            expect="holds" if _revoke else "violated",
            variant_options={} if _revoke else {"revoke_on_syscall": False},
            pair="time-slice-unrevoked" if _revoke else "time-slice",
            setup=_slice_setup,
            threads=lambda data: [ThreadSpec(slice_user, 0), ThreadSpec(bystander, None)],
            check_step=_slice_check,
            variants=("linux-7.0",),
            default_variant="linux-7.0",
            area_size=64,
            ncpus=1,
            bounds={"preemptions": 3, "migrations": 0, "signals": 0},
        )
    )

# ====================================================================== syscall in cs


def add_with_syscall(ctx: Context, v: int, cpu: int):
    """load_add_store with a system call between the load and the commit."""
    cs = ctx.cs("load_syscall_add_store")
    try:
        if not (yield from _enter(ctx, cs, cpu)):
            return -1
        value = yield Load(v, size=8, ip=cs.ip(1))
        yield Syscall("getpid", ip=cs.ip(2))
        yield Store(v, value + 1, size=8, ip=cs.ip(3), commit=True)
    except Abort:
        return -1
    return 0


def percpu_add_with_syscall(ctx: Context):
    counters = ctx.get("counters")
    done = 0
    while done < 1:
        cpu = yield from current_cpu(ctx)
        ret = yield from add_with_syscall(ctx, counters + 8 * cpu, cpu)
        if ret == 0:
            done += 1


def _syscall_setup(m: Machine) -> dict:
    data = _counter_setup(m)
    data["adds"] = 1
    return data


_add(
    Scenario(
        name="syscall-in-cs",
        title="a system call inside a critical section",
        doc="Two threads add to a per-CPU counter with a critical section that makes a system "
        "call before its commit. Property: no thread is killed and the counter is exact. "
        "Linux: violated - a system call inside a critical section is a programming error, "
        "and kernels built with CONFIG_DEBUG_RSEQ kill the thread. FreeBSD (seed 004): holds - "
        "no signal, and a switch during the call aborts the section on return.",
        expect="violated",
        expect_by_variant={"freebsd-2021": "holds"},
        setup=_syscall_setup,
        threads=lambda data: [ThreadSpec(percpu_add_with_syscall, 0), ThreadSpec(percpu_add_with_syscall, None)],
        check_final=_counter_final,
        variants=LINUX + ("freebsd-2021",),
        ncpus=1,
        extra_sections={"load_syscall_add_store": 4},
    )
)
