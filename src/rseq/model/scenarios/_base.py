"""What a scenario is: the threads a model machine starts with, the
property they must keep, and the variants and bounds to check it under."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import _abi
from .._machine import TLS_BASE, Machine
from .._program import Context
from ..variants import VARIANTS

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
    #: ``scale(data, n)``: the thread specs for ``n`` threads, for scenarios
    #: whose thread count is a parameter (``--threads``); None: fixed.
    scale: Callable[[dict, int], list[ThreadSpec]] | None = None

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
            "scales": self.scale is not None,
        }

    def build(self, variant_name: str | None = None, threads: int | None = None) -> Machine:
        """A machine with the scenario set up under ``variant_name``;
        ``threads`` changes the thread count where the scenario scales."""
        if threads is not None and self.scale is None:
            raise ValueError(f"scenario {self.name} has a fixed number of threads")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        variant = VARIANTS[variant_name or self.default_variant]
        if self.variant_options:
            variant = variant.with_options(**self.variant_options)
        m = Machine(variant, self.ncpus)
        sections = m.define_sections(SIG, self.extra_sections)
        data = self.setup(m)
        specs = self.threads(data) if threads is None else self.scale(data, threads)
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
                    raise RuntimeError(
                        f"{self.name}: registration under {variant.name} failed: {result}"
                    )
            t.start()
        for t in m.threads:
            prefix = f"{t.name}."
            t.private = tuple((r.start, r.end) for r in m.regions if r.name.startswith(prefix))
        for t, spec in zip(m.threads, specs):
            if spec.cpu is not None:
                m.schedule_in(t, spec.cpu)
        m.kernel_writes = []
        return m
