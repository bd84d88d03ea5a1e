"""Shared-memory pools of fixed-size blocks: ``rseq.Pool``.

A pool is one file (in ``/dev/shm`` by default) of ``block_count`` blocks of
``block_size`` bytes that any number of processes and threads allocate and
free.  Each CPU caches free block indexes on a stack that ``alloc`` pops and
``free`` pushes with one restartable sequence (no atomic instruction); a
shared overflow refills and drains them.  Every allocated block records its
owner (pid and start time) inside the allocating sequence, so a process
killed at any instant leaves each block either free or owned by it, and
``reclaim()`` returns the blocks of dead owners.  The design and the
argument are in csrc/lib/pool.h; the file handling is ``_shmfile``'s.

Blocks are named by index, which is what crosses processes: send the index
through a ring, a queue or a pipe, and ``pool.view(index)`` in the receiver
gives the same memory without a copy.
"""
from __future__ import annotations

import dataclasses
import mmap
import os

from . import _core, _procid, _shmfile

MAGIC = b"RSEQPOOL"
VERSION = 1
HEADER_SIZE = 4096
BLOCK_ALIGN = 64
MAX_BLOCKS = 1 << 32
MAX_CACHE = 1 << 16
MAX_BATCH = 64
STACK_HEAD = 64
LINE = 128          # x86 prefetchers pull 128-byte pairs: keep CPUs' words apart
MAX_SIZE = 1 << 46

# block_size, block_count, possible_cpus, cache, batch, control_offset,
# stacks_offset, stack_size, owners_offset, bitmap_offset, blocks_offset,
# total_size, creator_pid
FORMAT = _shmfile.HeaderFormat(MAGIC, VERSION, "QQIIIQQQQQQQI", "pool")


class PoolError(_core.ArenaError):
    """A pool cannot be used as asked (read-only, closed, bad argument)."""


class PoolExhaustedError(PoolError):
    """Every block of the pool is owned by a live process."""


class PoolOwnershipError(PoolError):
    """free() or give() of a block this process does not own: a double free,
    a block owned by another process, or a block that is free."""


for _cls in (PoolError, PoolExhaustedError, PoolOwnershipError):
    _cls.__module__ = "rseq"


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything is in a pool file."""

    block_size: int
    block_count: int
    possible_cpus: int
    cache: int
    batch: int
    control_offset: int
    stacks_offset: int
    stack_size: int
    owners_offset: int
    bitmap_offset: int
    blocks_offset: int
    total_size: int

    @classmethod
    def compute(cls, block_size: int, block_count: int, possible_cpus: int,
                cache: int) -> Layout:
        batch = max(1, min(cache // 2, MAX_BATCH))
        control_offset = HEADER_SIZE
        stacks_offset = control_offset + LINE
        stack_size = _round_up(STACK_HEAD + 8 * cache, LINE)
        owners_offset = _round_up(stacks_offset + possible_cpus * stack_size, LINE)
        bitmap_offset = _round_up(owners_offset + 8 * block_count, LINE)
        blocks_offset = _round_up(bitmap_offset + 8 * ((block_count + 63) // 64),
                                  mmap.PAGESIZE)
        return cls(block_size, block_count, possible_cpus, cache, batch, control_offset,
                   stacks_offset, stack_size, owners_offset, bitmap_offset, blocks_offset,
                   blocks_offset + block_count * block_size)

    def pack(self, creator_pid: int) -> bytes:
        return FORMAT.pack(*dataclasses.astuple(self), creator_pid)


def parse_header(data: bytes, file_size: int, possible_cpus: int) -> Layout:
    """Validate a pool header; its layout, or ArenaFormatError."""
    err = _core.ArenaFormatError
    values = FORMAT.unpack(data, file_size)
    found = Layout(*values[:-1])
    if not (1 <= found.block_count <= MAX_BLOCKS and 1 <= found.cache <= MAX_CACHE
            and found.block_size > 0 and found.block_size % BLOCK_ALIGN == 0
            and 1 <= found.possible_cpus <= 1 << 16):
        raise err(f"pool header out of range: {found.block_count} blocks of "
                  f"{found.block_size} bytes, cache {found.cache}, "
                  f"{found.possible_cpus} CPUs")
    expected = Layout.compute(found.block_size, found.block_count, found.possible_cpus,
                              found.cache)
    if found != expected:
        raise err("pool header layout is inconsistent with its own parameters")
    if found.possible_cpus != possible_cpus:
        raise err(f"pool made for {found.possible_cpus} possible CPUs; this machine has "
                  f"{possible_cpus}")
    if file_size < found.total_size:
        raise err(f"truncated pool: {file_size} bytes, its layout needs {found.total_size}")
    return found


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool (counts move while others use it)."""

    block_count: int
    block_size: int
    free_per_cpu: list[int]     # free blocks cached on each CPU's stack
    in_overflow: int            # free blocks in the shared overflow
    free: int                   # all free blocks
    allocated: int              # block_count - free
    live_owned: int             # allocated blocks whose owner runs
    dead_owned: int             # allocated blocks of dead owners (reclaim() frees them)
    owners: dict[int, int]      # pid -> blocks, live owners only


_ERRORS: tuple = (PoolError, PoolExhaustedError, PoolOwnershipError, _core.ArenaFormatError)


class Pool:
    """A pool of fixed-size blocks in shared memory.

    ``Pool.create(name, block_size=, block_count=)`` makes one,
    ``Pool.open(name)`` maps an existing one (from any process),
    ``Pool.unlink(name)`` removes the name.  ``pool.alloc()`` returns a
    :class:`PoolBlock` (``.index``, the buffer protocol, ``with`` frees it),
    ``pool.alloc_index()`` just the index; ``pool.free(block_or_index)``;
    ``pool.view(index)`` is the block's memory in any process;
    ``pool.give(index, pid)`` hands a block to another process, which then
    frees it; ``pool.reclaim()`` returns dead processes' blocks (it also runs
    by itself before an allocation reports exhaustion); ``pool.stats()``.
    """

    def __init__(self, path: str, mapping: mmap.mmap, layout: Layout, pool_map,
                 readonly: bool):
        # Use Pool.create() or Pool.open().
        self._path = path
        self._layout = layout
        self._mmap: mmap.mmap | None = mapping
        self._map = pool_map
        self._readonly = readonly
        # The hot methods are the C methods themselves: no Python frame.
        self.alloc = pool_map.alloc
        self.alloc_index = pool_map.alloc_index
        self.free = pool_map.free
        self.view = pool_map.view

    @staticmethod
    def _build_map(module, mapping: mmap.mmap, layout: Layout, readonly: bool):
        """``module._PoolMap`` (rseq._core, or the test build rseq._inject)
        over the mapping; it checks the layout against the mapping again."""
        return module._PoolMap(mapping, layout.block_size, layout.block_count,
                               layout.possible_cpus, layout.cache, layout.batch,
                               layout.control_offset, layout.stacks_offset, layout.stack_size,
                               layout.owners_offset, layout.bitmap_offset,
                               layout.blocks_offset, _ERRORS, module.PoolBlock, readonly)

    # -- creation and opening ------------------------------------------------

    @classmethod
    def create(cls, name: str | os.PathLike, *, block_size: int, block_count: int,
               cache: int | None = None) -> Pool:
        """Create a new pool; FileExistsError (naming it) if the name is taken.

        ``block_size`` is a positive multiple of 64 (every block starts on a
        64-byte line), ``block_count`` at most 2**32.  ``cache`` is how many
        free blocks each CPU may keep on its stack (default: a quarter of the
        pool shared among the CPUs, at most 256).  Space is reserved at
        creation (OSError ENOSPC when the file system has no room) and the
        file is published complete, owner-only (0600), or not at all.
        """
        for label, value in (("block_size", block_size), ("block_count", block_count)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{label} must be an int, not {type(value).__name__}")
        if block_size <= 0 or block_size % BLOCK_ALIGN:
            raise ValueError(f"block_size must be a positive multiple of {BLOCK_ALIGN} "
                             f"(blocks are 64-byte aligned), not {block_size}")
        if not 1 <= block_count <= MAX_BLOCKS:
            raise ValueError(f"block_count must be in 1..{MAX_BLOCKS}, not {block_count}")
        cpus = _core.POSSIBLE_CPUS
        if cache is None:
            cache = max(1, min(256, block_count // (4 * cpus)))
        if not isinstance(cache, int) or isinstance(cache, bool) or \
                not 1 <= cache <= min(MAX_CACHE, block_count):
            raise ValueError(f"cache must be an int in 1..{min(MAX_CACHE, block_count)}, "
                             f"not {cache!r}")
        layout = Layout.compute(block_size, block_count, cpus, cache)
        if layout.total_size > MAX_SIZE:
            raise ValueError(f"a pool of {block_count} blocks of {block_size} bytes takes "
                             f"{layout.total_size} bytes: more than {MAX_SIZE}")
        built = []

        def prepare(mapping: mmap.mmap) -> None:
            pool_map = cls._build_map(_core, mapping, layout, False)
            pool_map.initialise()
            built.append(pool_map)

        try:
            path, mapping = _shmfile.create(name, layout.total_size, layout.pack(os.getpid()),
                                            what="pool", prepare=prepare)
        except BaseException:
            built.clear()
            raise
        return cls(path, mapping, layout, built[0], False)

    @classmethod
    def open(cls, name: str | os.PathLike, *, readonly: bool = False,
             trust: object = None) -> Pool:
        """Map an existing pool, validating it first (ArenaFormatError).

        The same checks as ``Arena.open``: no symbolic link, a regular file
        owned by this uid or root and not writable by others (PermissionError
        naming the check), unless ``trust`` accepts more.  ``readonly=True``
        maps it read-only: ``stats()`` and ``view()`` (read-only memory)
        work, everything that writes raises PoolError.
        """
        path, mapping, layout = _shmfile.open_mapped(
            name, lambda head, size: parse_header(head, size, _core.POSSIBLE_CPUS),
            header_size=HEADER_SIZE, readonly=bool(readonly), trust=trust, what="pool")
        try:
            pool_map = cls._build_map(_core, mapping, layout, bool(readonly))
        except BaseException:
            mapping.close()
            raise
        return cls(path, mapping, layout, pool_map, bool(readonly))

    @staticmethod
    def unlink(name: str | os.PathLike) -> None:
        """Remove the pool's name; processes that have it open keep using it."""
        os.unlink(_shmfile.path_for(name, "pool"))

    # -- use (alloc, alloc_index, free and view are replaced per instance by
    # -- the C methods of the map; these definitions document them) ---------

    def alloc(self) -> _core.PoolBlock:
        """A free block, owned by this process: a PoolBlock.  Runs reclaim()
        and retries before raising PoolExhaustedError."""
        return self._live_map().alloc()

    def alloc_index(self) -> int:
        """Like alloc(), but only the index (the fastest form)."""
        return self._live_map().alloc_index()

    def free(self, block: _core.PoolBlock | int) -> None:
        """Return a block (PoolBlock or index) this process owns.
        PoolOwnershipError for a double free or another process's block."""
        self._live_map().free(block)

    def view(self, index: int) -> memoryview:
        """Block ``index``'s memory (writable unless opened read-only), in any
        process, without a copy."""
        return self._live_map().view(index)

    def give(self, block: _core.PoolBlock | int, pid: int) -> None:
        """Hand a block this process owns to the live process ``pid``: from
        now on that process owns it (and frees it); reclaim() returns it if
        that process dies first.  Then send it the index."""
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"pid must be an int, not {type(pid).__name__}")
        started = _procid.start_time(pid)
        if started is None:
            raise PoolError(f"give(): no live process {pid}")
        self._live_map().give(block, pid, started)

    def reclaim(self) -> int:
        """Return the blocks of processes that no longer run (pid and start
        time) to the pool; the number returned.  Safe at any time, from any
        process, concurrently with everything else."""
        return self._live_map().census(True)["reclaimed"]

    def stats(self) -> PoolStats:
        """Free per CPU, in the overflow, allocated, owned by live and by
        dead processes (a snapshot: counts move while others work)."""
        pool_map = self._live_map()
        census = pool_map.census(False)
        per_cpu = pool_map.stack_counts()
        free = census["on_stacks"] + census["in_overflow"]
        owners: dict[int, int] = {}
        for (pid, started), count in pool_map.owners().items():
            if _procid.alive(pid, started) or (started == 0 and _procid.start_time(pid)):
                owners[pid] = owners.get(pid, 0) + count
        return PoolStats(self._layout.block_count, self._layout.block_size, per_cpu,
                         census["in_overflow"], free, self._layout.block_count - free,
                         census["live_owned"], census["dead_owned"], owners)

    def owner(self, index: int) -> tuple[int, int] | None:
        """(pid, start time) recorded for block ``index``, or None if the
        block is free in the overflow.  (For a block cached on a CPU stack
        this is its last owner.)"""
        pid, started, _freed = self._live_map().owner(index)
        return None if pid == 0 else (pid, started)

    # -- documented internals, for rseq.testing and the tests ----------------

    def _map_through(self, module):
        """The map built by ``module._PoolMap`` over this pool's mapping:
        the stress harness passes the test build ``rseq._inject`` so its
        injection points run inside the pool's sequences."""
        self._live_map()
        return self._build_map(module, self._mmap, self._layout, self._readonly)

    def _live_map(self):
        if self._map is None:
            raise PoolError("the pool is closed")
        return self._map

    @property
    def path(self) -> str:
        return self._path

    @property
    def block_size(self) -> int:
        return self._layout.block_size

    @property
    def block_count(self) -> int:
        return self._layout.block_count

    @property
    def cache(self) -> int:
        """Free blocks each CPU's stack can hold."""
        return self._layout.cache

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def size(self) -> int:
        """Bytes mapped."""
        return self._layout.total_size

    @property
    def closed(self) -> bool:
        return self._map is None

    def close(self) -> None:
        """Drop this object's mapping; blocks and views taken from it keep
        the memory mapped until they are gone."""
        self._map = None
        self._mmap = None
        for name in ("alloc", "alloc_index", "free", "view"):
            self.__dict__.pop(name, None)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else \
            f"{self.block_count} blocks of {self.block_size} bytes"
        return f"<rseq.Pool {self._path!r} {state}>"


# -- the command line: python -m rseq pool stats NAME -------------------------

def format_stats(pool: Pool, stats: PoolStats) -> str:
    lines = [f"pool {pool.path}: {stats.block_count} blocks of {stats.block_size} bytes "
             f"(cache {pool.cache} per CPU)",
             f"  free            {stats.free} ({stats.in_overflow} in the overflow, "
             f"{stats.free - stats.in_overflow} on CPU stacks)",
             "  free per CPU    " + " ".join(f"cpu{c}:{n}" for c, n in
                                             enumerate(stats.free_per_cpu) if n) or "-",
             f"  allocated       {stats.allocated} ({stats.live_owned} by live processes, "
             f"{stats.dead_owned} by dead ones: reclaim() returns those)"]
    if stats.owners:
        lines.append("  owners          " + " ".join(
            f"pid {pid}:{n}" for pid, n in sorted(stats.owners.items())))
    return "\n".join(lines)


def _run_stats(args) -> int:
    import json

    from ._cli import UsageError
    try:
        with Pool.open(args.name, readonly=True, trust=args.trust) as pool:
            stats = pool.stats()
            if args.json:
                print(json.dumps(dataclasses.asdict(stats) | {"path": pool.path,
                                                              "cache": pool.cache}))
            else:
                print(format_stats(pool, stats))
    except (OSError, _core.ArenaFormatError, ValueError) as e:
        raise UsageError(e.strerror if isinstance(e, OSError) and e.strerror else str(e)) \
            from None
    return 0


def add_subcommand(subparsers) -> None:
    """``pool stats NAME``: this module's part of ``rseq._cli``'s tree."""
    parser = subparsers.add_parser("pool", help="look at a shared-memory rseq.Pool",
                                   description="Look at a shared-memory rseq.Pool.")
    actions = parser.add_subparsers(dest="pool_command", required=True, metavar="SUBCOMMAND")
    stats = actions.add_parser("stats", help="free per CPU, in the overflow, allocated, "
                               "owned by live and by dead processes",
                               description="Free blocks per CPU and in the overflow, "
                               "allocated blocks and who owns them (opened read-only).")
    stats.add_argument("name", help="the pool's name (in /dev/shm) or path")
    stats.add_argument("--json", action="store_true", help="the fields of rseq.PoolStats")
    stats.add_argument("--trust", metavar="WHO",
                       help="accept a file owned by this user (see Pool.open)")
    stats.set_defaults(run=_run_stats)
