"""Per-CPU event rings in shared memory: ``rseq.Ring``.

Many producers (threads and processes), one consumer.  A producer appends
a record to the lane of the CPU it runs on with one restartable sequence
(reserve, copy, commit by one store: see csrc/lib/ring.h), so a producer
killed at any instant leaves nothing half-done and holds nothing.  The
consumer takes records from every lane, ordered by time within a batch
(always in order within a lane), and can sleep in the kernel until a
producer commits.

The file goes through ``_shmfile`` like every shared file of the package:
owner-only, space reserved, published complete by ``link()``, opened with
``O_NOFOLLOW`` and checked before it is trusted, with a validated header.
"""
from __future__ import annotations

import dataclasses
import errno
import mmap
import os
from collections.abc import Iterator

from . import _core, _procid, _shmfile

MAGIC = b"RSEQRING"
VERSION = 1
HEADER_SIZE = 4096
CONTROL_OFFSET = 4096
LANES_OFFSET = 8192
PAGE = 4096
MIN_SIZE = 4096
DEFAULT_SIZE_PER_CPU = 256 * 1024
DEFAULT_MAX_RECORD = 4096
POLICIES = ("drop", "overwrite")
FLAG_TIMESTAMPS = 1

# header_size, possible_cpus, size, max_record, policy, flags, control_offset,
# lanes_offset, lane_stride, total_size, creator_pid
_HEADER = _shmfile.HeaderFormat(MAGIC, VERSION, "IIIIIIQQQQI", "ring")


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def _record_size(length: int) -> int:
    return _round_up(_core.RING_RECORD_HEADER + length, 8)


class RingBusyError(_core.ArenaError):
    """Another live process (or another handle in this process) is the
    ring's consumer: a ring has one consumer at a time."""


RingBusyError.__module__ = "rseq"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything is in a ring file."""

    possible_cpus: int
    size: int
    max_record: int
    policy: str
    timestamps: bool
    lane_stride: int
    total_size: int

    @classmethod
    def compute(cls, possible_cpus: int, size: int, max_record: int, policy: str,
                timestamps: bool) -> Layout:
        lane_stride = _round_up(_core.RING_LANE_CONTROL + size + _record_size(max_record), PAGE)
        return cls(possible_cpus, size, max_record, policy, timestamps, lane_stride,
                   LANES_OFFSET + (possible_cpus + 1) * lane_stride)

    def pack(self, creator_pid: int) -> bytes:
        flags = FLAG_TIMESTAMPS if self.timestamps else 0
        return _HEADER.pack(HEADER_SIZE, self.possible_cpus, self.size, self.max_record,
                            POLICIES.index(self.policy), flags, CONTROL_OFFSET, LANES_OFFSET,
                            self.lane_stride, self.total_size, creator_pid)


def parse_header(data: bytes, file_size: int, possible_cpus: int) -> Layout:
    """Validate a ring header; return its layout or raise ArenaFormatError."""
    err = _core.ArenaFormatError
    (header_size, cpus, size, max_record, policy, flags, control_offset, lanes_offset,
     lane_stride, total_size, _creator) = _HEADER.unpack(data, file_size)
    if (header_size != HEADER_SIZE or control_offset != CONTROL_OFFSET
            or lanes_offset != LANES_OFFSET or flags & ~FLAG_TIMESTAMPS
            or policy >= len(POLICIES)):
        raise err(f"ring header has an unknown layout (header size {header_size}, policy "
                  f"{policy}, flags {flags:#x})")
    if not (1 <= cpus <= 1 << 16) or not _valid_size(size) or not 1 <= max_record <= size // 4:
        raise err(f"ring header out of range: {cpus} CPUs, {size} bytes per lane, records "
                  f"up to {max_record} bytes")
    expected = Layout.compute(cpus, size, max_record, POLICIES[policy],
                              bool(flags & FLAG_TIMESTAMPS))
    if (lane_stride, total_size) != (expected.lane_stride, expected.total_size):
        raise err("ring header layout is inconsistent with its own parameters")
    if cpus != possible_cpus:
        raise err(f"ring made for {cpus} possible CPUs; this machine has {possible_cpus}")
    if file_size < total_size:
        raise err(f"truncated ring: {file_size} bytes, its layout needs {total_size}")
    return expected


def _valid_size(size: int) -> bool:
    return MIN_SIZE <= size <= _core.RING_MAX_SIZE and size & (size - 1) == 0


@dataclasses.dataclass(frozen=True)
class LaneStats:
    """The accounting of one lane: ``produced == committed + dropped`` and
    ``committed == consumed + overwritten + in_ring``."""

    produced: int
    committed: int
    consumed: int
    dropped: int
    overwritten: int
    in_ring: int


@dataclasses.dataclass(frozen=True)
class RingStats:
    """``Ring.stats()``: totals, then each CPU's lane and the fallback lane
    (threads without rseq).  At every quiescent point ``produced ==
    consumed + dropped + overwritten + in_ring``; records a consumer has
    taken but not acknowledged are still ``in_ring``."""

    produced: int
    committed: int
    consumed: int
    dropped: int
    overwritten: int
    in_ring: int
    per_cpu: tuple[LaneStats, ...]
    fallback: LaneStats
    consumer: tuple[int, int] | None  # (pid, start time) of the lease holder

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Ring:
    """A shared-memory ring of records, one lane per CPU, many producers
    and one consumer.

    ``Ring.create(name)`` makes one, ``Ring.open(name)`` maps an existing
    one (from any process), ``Ring.unlink(name)`` removes the name.  A name
    without a slash lives in /dev/shm; a name with one is a file path.

    ``put(data)`` appends a bytes-like record (no pickling; a record longer
    than ``max_record`` is a ValueError) and returns False when the record
    was dropped because its lane was full ("drop" policy).  ``consume()``
    takes records; the first call makes this handle the ring's consumer (one
    at a time: RingBusyError otherwise).  Use as a context manager.
    """

    def __init__(self, path: str, mapping: mmap.mmap, layout: Layout, readonly: bool):
        # Use Ring.create() or Ring.open().
        self._path = path
        self._layout = layout
        self._mmap: mmap.mmap | None = mapping
        self._readonly = readonly
        self._map = _core._RingMap(mapping, CONTROL_OFFSET, LANES_OFFSET, layout.lane_stride,
                                   layout.possible_cpus, layout.size, layout.max_record,
                                   layout.policy == "overwrite", layout.timestamps, readonly)
        self._consumer: tuple[int, int] | None = None
        self.replaced: tuple[int, int] | None = None
        # The producer's hot path: the C method itself, no Python frame.
        self.put = self._map.put

    # -- creation and opening ------------------------------------------------

    @classmethod
    def create(cls, name: str | os.PathLike, *, size_per_cpu: int = DEFAULT_SIZE_PER_CPU,
               max_record: int | None = None, policy: str = "drop",
               timestamps: bool = True) -> Ring:
        """Create a new ring; FileExistsError if the name is taken.

        ``size_per_cpu``: bytes of each CPU's lane (rounded up to a power of
        two, 4 KiB to 1 GiB); ``max_record``: the longest record in bytes
        (at most a quarter of a lane; default 4096 or that quarter, whichever
        is smaller); ``policy``: ``"drop"`` (a full lane
        refuses new records and counts them) or ``"overwrite"`` (a flight
        recorder: the newest records are kept, the consumer is told how many
        it missed); ``timestamps``: record CLOCK_MONOTONIC in every record
        (and order batches by it).  The file is owner-only (0600).
        """
        if not isinstance(size_per_cpu, int) or isinstance(size_per_cpu, bool) or \
                not MIN_SIZE <= size_per_cpu <= _core.RING_MAX_SIZE:
            raise ValueError(f"size_per_cpu must be an int in {MIN_SIZE}.."
                             f"{_core.RING_MAX_SIZE}, not {size_per_cpu!r}")
        size = 1 << (size_per_cpu - 1).bit_length()
        if max_record is None:
            max_record = min(DEFAULT_MAX_RECORD, size // 4)
        if not isinstance(max_record, int) or isinstance(max_record, bool) or \
                not 1 <= max_record <= size // 4:
            raise ValueError(f"max_record must be an int in 1..{size // 4} (a quarter of "
                             f"a {size}-byte lane), not {max_record!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be 'drop' or 'overwrite', not {policy!r}")
        layout = Layout.compute(_core.POSSIBLE_CPUS, size, max_record, policy,
                                bool(timestamps))
        path, mapping = _shmfile.create(name, layout.total_size, layout.pack(os.getpid()),
                                        what="ring")
        return cls(path, mapping, layout, False)

    @classmethod
    def open(cls, name: str | os.PathLike, *, readonly: bool = False,
             trust: object = None) -> Ring:
        """Map an existing ring, validating it first (ArenaFormatError).

        ``readonly``: map it read-only (a monitor: ``stats()`` works,
        ``put`` and ``consume`` do not).  ``trust``: see ``Arena.open``.
        """
        path, mapping, layout = _shmfile.open_mapped(
            name, lambda head, size: parse_header(head, size, _core.POSSIBLE_CPUS),
            header_size=HEADER_SIZE, readonly=readonly, trust=trust, what="ring")
        return cls(path, mapping, layout, readonly)

    @staticmethod
    def unlink(name: str | os.PathLike) -> None:
        """Remove the ring's name; processes that have it open keep using it."""
        path = _shmfile.path_for(name, "ring")
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"no ring {path!r}", path) from None

    # -- consumer ------------------------------------------------------------

    def _live_map(self):
        if self._map is None:
            raise ValueError("the ring is closed")
        return self._map

    def _become_consumer(self) -> None:
        ring_map = self._live_map()
        if self._readonly:
            raise PermissionError(errno.EPERM, f"ring {self._path!r} was opened read-only: "
                                  f"it cannot be consumed")
        me = _procid.identity()
        if self._consumer is not None and self._consumer != me:
            # A forked child of the consumer: the lease is its parent's.
            ring_map.detach()
            self._consumer = None
        for _ in range(1000):
            pid, started = ring_map.lease()
            if (pid, started) == (0, 0):
                if ring_map.lease_cas(0, 0, *me):
                    break
                continue
            if (pid, started) == me:
                raise RingBusyError(f"ring {self._path!r} is already consumed by another "
                                    f"handle in this process")
            if _procid.alive(pid, started):
                raise RingBusyError(f"ring {self._path!r} already has a consumer: process "
                                    f"{pid}")
            # The consumer died: take over; it resumes where the dead one stopped.
            if ring_map.lease_cas(pid, started, *me):
                self.replaced = (pid, started)
                break
        else:
            raise RingBusyError(f"ring {self._path!r}: the consumer lease keeps changing")
        ring_map.attach()
        self._consumer = me

    def consume(self, max: int = 1024, timeout: float | None = 0.0, *,
                records: bool = False) -> list:
        """Take up to ``max`` records from every lane.

        Returns a list of ``bytes`` (with ``records=True``, of
        ``RingRecord(data, cpu, seq, time_ns, pid)``), ordered by time within
        the batch when the ring records time, and always in order within a
        lane.  ``timeout``: 0 (default) returns at once, even empty; None
        waits until at least one record arrives; a number of seconds waits
        at most that long (sleeping in the kernel, the GIL released).

        Delivery contract: calling ``consume()`` (or ``ack()``, or
        ``close()``) acknowledges every record taken before.  A consumer
        that dies loses nothing: the next consumer takes over the lease and
        starts with the records the dead one had taken but not acknowledged
        (so exactly that last batch may be delivered twice), then continues.
        """
        if self._consumer is None or self._consumer[0] != os.getpid():
            self._become_consumer()
        return self._live_map().consume(max, timeout, records)

    def ack(self) -> None:
        """Acknowledge every record taken so far (consume() does it too)."""
        if self._consumer is not None and self._map is not None:
            self._map.ack()

    def __iter__(self) -> Iterator[bytes]:
        """The records now in the ring, until it is empty (no waiting)."""
        while True:
            batch = self.consume(1024, 0)
            if not batch:
                return
            yield from batch

    def follow(self, timeout: float | None = None, *, records: bool = False) -> Iterator:
        """Records as they arrive, forever (or until ``timeout`` seconds pass
        with nothing new): ``tail -f`` for a ring."""
        while True:
            batch = self.consume(1024, timeout, records=records)
            if not batch:
                return
            yield from batch

    # -- accounting ------------------------------------------------------------

    def stats(self) -> RingStats:
        """Produced, committed, consumed, dropped, overwritten and in-ring
        record counts, in total and per lane (exact at quiescent points)."""
        ring_map = self._live_map()
        lanes = [LaneStats(*t) for t in ring_map.stats()]
        totals = [sum(getattr(lane, f.name) for lane in lanes)
                  for f in dataclasses.fields(LaneStats)]
        lease = ring_map.lease()
        return RingStats(*totals, per_cpu=tuple(lanes[:-1]), fallback=lanes[-1],
                         consumer=None if lease == (0, 0) else lease)

    # -- properties and life cycle -------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def size_per_cpu(self) -> int:
        return self._layout.size

    @property
    def max_record(self) -> int:
        return self._layout.max_record

    @property
    def policy(self) -> str:
        return self._layout.policy

    @property
    def timestamps(self) -> bool:
        return self._layout.timestamps

    @property
    def possible_cpus(self) -> int:
        return self._layout.possible_cpus

    @property
    def size(self) -> int:
        """Bytes mapped."""
        return self._layout.total_size

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def closed(self) -> bool:
        return self._map is None

    def close(self) -> None:
        """Acknowledge what was taken, give up the consumer lease (if this
        handle held it) and drop the mapping."""
        self._close(acknowledge=True)

    def _close(self, acknowledge: bool) -> None:
        ring_map = self._map
        if ring_map is None:
            return
        if self._consumer is not None and self._consumer == _procid.identity():
            if acknowledge:
                ring_map.ack()
            ring_map.detach()
            ring_map.lease_cas(*self._consumer, 0, 0)
        self._consumer = None
        self._map = None
        self.put = _closed_put
        # The mapping itself goes when the last reference (a C API handle
        # user's Ring, a _RingMap) is gone.
        self._mmap = None

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A consumer collected without close() must not hold the lease (its
        # process is alive, so nobody could take it over); what it took and
        # did not acknowledge stays in the ring for the next consumer.
        try:
            if self._consumer is not None and self._map is not None:
                self._close(acknowledge=False)
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else (f"{self.policy}, {self.size_per_cpu} bytes "
                                              f"per CPU, records up to {self.max_record}")
        return f"<rseq.Ring {self._path!r} {state}>"


def _closed_put(data: object) -> bool:
    raise ValueError("the ring is closed")


# ---------------------------------------------------------------------------
# Command line: python -m rseq ring stats|tail NAME
# ---------------------------------------------------------------------------

def _format_stats(name: str, stats: RingStats, ring: Ring) -> str:
    fields = [f.name for f in dataclasses.fields(LaneStats)]
    width = max(len(f) for f in fields)
    lines = [f"ring {ring.path}: {ring.policy}, {ring.size_per_cpu} bytes per CPU, records "
             f"up to {ring.max_record} bytes, {ring.possible_cpus} CPUs"
             + (", timestamps" if ring.timestamps else ""),
             "  consumer  " + (f"process {stats.consumer[0]}" if stats.consumer else "none")]
    header = "  " + " " * width + "   total" + "".join(
        f"{'cpu ' + str(i):>12}" for i in range(len(stats.per_cpu))) + f"{'fallback':>12}"
    lines.append(header)
    for f in fields:
        lanes = [getattr(lane, f) for lane in stats.per_cpu] + [getattr(stats.fallback, f)]
        lines.append(f"  {f:<{width}} {getattr(stats, f):>7}"
                     + "".join(f"{v:>12}" for v in lanes))
    return "\n".join(lines)


def _cmd_stats(args) -> int:
    import json
    with Ring.open(args.name, readonly=True) as ring:
        stats = ring.stats()
        if args.json:
            print(json.dumps(stats.as_dict(), indent=2))
        else:
            print(_format_stats(args.name, stats, ring))
    return 0


def _show(rec, as_records: bool) -> str:
    data = rec.data if as_records else rec
    try:
        text = data.decode("utf-8")
        shown = text if text.isprintable() else repr(data)
    except UnicodeDecodeError:
        shown = repr(data)
    if as_records:
        return f"cpu {rec.cpu} seq {rec.seq} pid {rec.pid} t {rec.time_ns}: {shown}"
    return shown


def _cmd_tail(args) -> int:
    import sys
    with Ring.open(args.name) as ring:
        count = 0
        try:
            for rec in ring.follow(timeout=args.timeout, records=args.records):
                print(_show(rec, args.records), flush=True)
                count += 1
                if args.count and count >= args.count:
                    break
        except BrokenPipeError:
            sys.stderr.close()
    return 0


def add_subcommand(subparsers) -> None:
    """``ring stats NAME`` and ``ring tail NAME`` in the package's one
    argparse tree (rseq._cli)."""
    from ._cli import positive_float, positive_int
    parser = subparsers.add_parser(
        "ring", help="the accounting of an rseq.Ring, or its records as they arrive",
        description="Look at an rseq.Ring from the command line.")
    sub = parser.add_subparsers(dest="ring_command", required=True, metavar="COMMAND")
    p = sub.add_parser("stats", help="produced, committed, consumed, dropped, overwritten, "
                       "in ring: in total and per CPU (opens the ring read-only)",
                       description="A ring's accounting, in total and per CPU; the ring is "
                                   "opened read-only, so this works beside its consumer.")
    p.add_argument("name", help="ring name (in /dev/shm) or path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run(_cmd_stats))
    p = sub.add_parser("tail", help="print records as they arrive, like tail -f (this "
                       "process becomes the ring's consumer: it takes the records)",
                       description="Print records as they arrive, like tail -f.  This "
                                   "process becomes the ring's consumer (one at a time): "
                                   "the records it prints are taken from the ring.")
    p.add_argument("name", help="ring name (in /dev/shm) or path")
    p.add_argument("--records", action="store_true",
                   help="show each record's CPU, sequence number, pid and time")
    p.add_argument("--count", type=positive_int, default=0, metavar="N",
                   help="stop after N records")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="stop after this long with nothing new (default: never)")
    p.set_defaults(run=_run(_cmd_tail))


def _run(command):
    """What the user can fix (no such ring, not a ring, busy, not allowed)
    is a UsageError: one line and status 2, never a traceback."""
    def run(args) -> int:
        from ._cli import UsageError
        try:
            return command(args)
        except (OSError, ValueError, _core.ArenaError) as e:
            raise UsageError(str(e)) from None
    return run
