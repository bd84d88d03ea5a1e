"""Shared-memory arenas of per-CPU counters: ``rseq.Arena``.

An arena is a file (in ``/dev/shm`` by default) that any process can map.
Its header carries a magic number, a version, its whole layout, the
possible-CPU count it was made for and a checksum; all of it is validated
before any offset in it is trusted (and the C side checks the layout against
the mapping once more).  Counters are 8 bytes per possible CPU, in per-CPU
regions so that CPUs never write each other's cache lines, plus one entry in
a key table.  The file itself is created, reserved, published and opened
by ``_shmfile`` (owner-only mode, ``posix_fallocate`` so that a full file
system is an ``OSError`` at creation and never a SIGBUS later, publication
by ``link()`` only once complete, ``O_NOFOLLOW`` and owner/mode checks on
open, read-only opening for monitors).
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import zlib

from . import _core, _shmfile

MAGIC = b"RSEQARNA"
# Version 2: a claim records the claimant's start time beside its pid.
VERSION = 2
HEADER_SIZE = 4096          # the key table starts on its own page
DEFAULT_CAPACITY = 1024
DEFAULT_KEY_MAX = 80        # entry of 128 bytes
INDEX_CPU_ID = 0
CLAIM_TIMEOUT = 5.0         # seconds counter() waits for a live process's claim
REGION_ALIGN = 128
SHM_DIR = _shmfile.SHM_DIR

# magic, version, header_size, possible_cpus, capacity, entry_size, key_max,
# index_mode, flags, table_offset, regions_offset, region_size, total_size,
# creator_pid, checksum (crc32 of everything before it)
_HEADER = struct.Struct("<8sIIIIIIIIQQQQII")
_CHECKSUMMED = _HEADER.size - 4


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything is in an arena file."""

    possible_cpus: int
    capacity: int
    key_max: int
    entry_size: int
    table_offset: int
    regions_offset: int
    region_size: int
    total_size: int

    @classmethod
    def compute(cls, possible_cpus: int, capacity: int, key_max: int) -> Layout:
        entry_size = _round_up(_core.ARENA_ENTRY_HEADER + key_max, 16)
        table_offset = HEADER_SIZE
        regions_offset = _round_up(table_offset + capacity * entry_size, mmap.PAGESIZE)
        # 128, not 64: x86 prefetchers fetch cache lines in 128-byte pairs,
        # so two CPUs' regions on adjacent 64-byte lines still slow each
        # other down (measured: 2 processes on one counter scaled 1.6x with
        # 64-byte regions, 1.9-2.0x with 128).  At most 64 bytes per CPU per
        # arena; a counter still costs 8 bytes per CPU.
        region_size = _round_up(capacity * 8, REGION_ALIGN)
        return cls(possible_cpus, capacity, key_max, entry_size, table_offset,
                   regions_offset, region_size, regions_offset + possible_cpus * region_size)

    def pack(self, creator_pid: int) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, self.possible_cpus, self.capacity,
                            self.entry_size, self.key_max, INDEX_CPU_ID, 0, self.table_offset,
                            self.regions_offset, self.region_size, self.total_size,
                            creator_pid, 0)[:_CHECKSUMMED]
        return body + struct.pack("<I", zlib.crc32(body))


def parse_header(data: bytes, file_size: int, possible_cpus: int) -> Layout:
    """Validate an arena header; return its layout or raise ArenaFormatError.

    ``data`` is the start of the file (at least the header, if the file has
    that much), ``file_size`` its size.  Every field is checked against the
    layout this version computes from the header's own parameters, so a
    header that passes describes exactly the layout we would have made.
    """
    err = _core.ArenaFormatError
    if len(data) < _HEADER.size or file_size < HEADER_SIZE:
        if data[:len(MAGIC)] != MAGIC[:len(data)] or not data:
            raise err("not an rseq arena (too short, and no arena magic)")
        raise err(f"truncated arena: {file_size} bytes, the header alone takes {HEADER_SIZE}")
    (magic, version, header_size, cpus, capacity, entry_size, key_max, index_mode, flags,
     table_offset, regions_offset, region_size, total_size, _creator,
     checksum) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise err("not an rseq arena (bad magic number)")
    if version != VERSION:
        raise err(f"arena version {version}: this rseq reads version {VERSION}")
    if zlib.crc32(data[:_CHECKSUMMED]) != checksum:
        raise err("arena header checksum mismatch: the header is corrupt")
    if header_size != HEADER_SIZE or index_mode != INDEX_CPU_ID or flags != 0:
        raise err(f"arena header has an unknown layout (header size {header_size}, "
                  f"index mode {index_mode}, flags {flags:#x})")
    if not (1 <= capacity <= 1 << 24) or not (1 <= key_max <= 4096) or not (1 <= cpus <= 1 << 16):
        raise err(f"arena header out of range: capacity {capacity}, key size {key_max}, "
                  f"{cpus} CPUs")
    expected = Layout.compute(cpus, capacity, key_max)
    found = Layout(cpus, capacity, key_max, entry_size, table_offset, regions_offset,
                   region_size, total_size)
    if found != expected:
        raise err("arena header layout is inconsistent with its own parameters")
    if cpus != possible_cpus:
        raise err(f"arena made for {cpus} possible CPUs; this machine has {possible_cpus}")
    if file_size < total_size:
        raise err(f"truncated arena: {file_size} bytes, its layout needs {total_size}")
    return found


def _encode_key(key: object, key_max: int) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"counter key must be str, not {type(key).__name__}")
    try:
        data = key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"counter key is not valid text: {e}") from None
    if not data:
        raise ValueError("counter key is empty")
    if len(data) > key_max:
        raise ValueError(f"counter key of {len(data)} bytes (UTF-8): this arena takes at "
                         f"most {key_max}")
    return data


class Arena:
    """A shared-memory arena of per-CPU counters.

    ``Arena.create(name)`` makes one, ``Arena.open(name)`` maps an existing
    one (from any process), ``Arena.unlink(name)`` removes the name.  A name
    without a slash lives in /dev/shm; a name with one is a file path.
    ``arena.counter(key)`` returns the counter for ``key``, creating it if
    needed; every process that opens the arena sees and updates the same
    counters.  Use as a context manager to close it.
    """

    def __init__(self, path: str, mapping: mmap.mmap, layout: Layout, arena_map,
                 readonly: bool):
        # Use Arena.create() or Arena.open().
        self._path = path
        self._layout = layout
        self._mmap: mmap.mmap | None = mapping
        self._map = arena_map
        self._readonly = readonly

    @staticmethod
    def _build_map(module, mapping: mmap.mmap, layout: Layout, readonly: bool):
        """The C view of the key table and counters: ``module._ArenaMap``
        (rseq._core, or the test build rseq._inject), which checks the
        layout against the mapping once more."""
        return module._ArenaMap(mapping, layout.table_offset, layout.entry_size,
                                layout.key_max, layout.capacity, layout.regions_offset,
                                layout.region_size, layout.possible_cpus, readonly)

    # -- creation and opening ------------------------------------------------

    @classmethod
    def create(cls, name: str | os.PathLike, *, capacity: int = DEFAULT_CAPACITY,
               key_max: int = DEFAULT_KEY_MAX) -> Arena:
        """Create a new arena; FileExistsError (naming it) if the name is taken.

        ``capacity`` is the number of counters it can hold, ``key_max`` the
        longest key in UTF-8 bytes.  The file is owner-only (0600); to let a
        monitor running as another user read it, ``os.chmod(arena.path,
        0o644)`` and have the monitor open it with ``readonly=True`` (and
        ``trust=`` naming the owner, unless that is root).  Its space is
        reserved when it is created: OSError(ENOSPC) if the file system has
        no room.  Nothing is left at the name if creation fails.
        """
        if not isinstance(capacity, int) or not 1 <= capacity <= 1 << 24:
            raise ValueError(f"capacity must be an int in 1..{1 << 24}, not {capacity!r}")
        if not isinstance(key_max, int) or not 1 <= key_max <= 4096:
            raise ValueError(f"key_max must be an int in 1..4096, not {key_max!r}")
        layout = Layout.compute(_core.POSSIBLE_CPUS, capacity, key_max)
        built = []
        try:
            path, mapping = _shmfile.create(
                name, layout.total_size, layout.pack(os.getpid()), what="arena",
                prepare=lambda m: built.append(cls._build_map(_core, m, layout, False)))
        except BaseException:
            built.clear()   # release the mapping now, not with the traceback
            raise
        return cls(path, mapping, layout, built[0], False)

    @classmethod
    def open(cls, name: str | os.PathLike, *, readonly: bool = False,
             trust: object = None) -> Arena:
        """Map an existing arena, validating it first (ArenaFormatError).

        The name is opened without following a symbolic link and must be a
        regular file owned by this process's effective uid or root, and not
        writable by group or others (PermissionError saying which check
        failed).  ``trust`` accepts more: a uid or user name (another owner),
        ``"group:NAME"`` (a group that may write it), or a list of those.

        ``readonly=True`` opens and maps the file read-only: every value can
        be read (``keys()``, ``values()``, ``get()``, counters' ``value()``
        and ``per_cpu()``), and writes (``add()``, ``reset()``, creating a
        counter) raise ArenaError.  This is what a monitor or exporter
        running as another user needs (the file must be readable by it).
        """
        path, mapping, layout = _shmfile.open_mapped(
            name, lambda head, size: parse_header(head, size, _core.POSSIBLE_CPUS),
            header_size=HEADER_SIZE, readonly=bool(readonly), trust=trust, what="arena")
        try:
            arena_map = cls._build_map(_core, mapping, layout, bool(readonly))
        except BaseException:
            mapping.close()
            raise
        return cls(path, mapping, layout, arena_map, bool(readonly))

    @staticmethod
    def unlink(name: str | os.PathLike) -> None:
        """Remove the arena's name; processes that have it open keep using it."""
        os.unlink(_shmfile.path_for(name, "arena"))

    # -- use ---------------------------------------------------------------

    def _live_map(self):
        if self._map is None:
            raise ValueError("the arena is closed")
        return self._map

    def counter(self, key: str) -> _core.ArenaCounter:
        """The counter stored under ``key`` (str), created at zero if absent.

        ArenaFullError when the arena has no room for a new key; ArenaError
        if the arena is open read-only and has no such key.  Waits (at most
        ``CLAIM_TIMEOUT`` seconds, answering Ctrl-C) while another live
        process is creating an entry this key may be in.
        """
        arena_map = self._live_map()
        data = _encode_key(key, self._layout.key_max)
        index = arena_map.find(data, not self._readonly, CLAIM_TIMEOUT)
        if index < 0:
            raise _core.ArenaError(f"arena {self._path!r} is open read-only: cannot create "
                                   f"counter {key!r}")
        return arena_map.counter(index, key)

    def get(self, key: str) -> _core.ArenaCounter | None:
        """The counter stored under ``key``, or None if there is none (a key
        that another process is still creating is not there yet)."""
        arena_map = self._live_map()
        index = arena_map.find(_encode_key(key, self._layout.key_max), False)
        return None if index < 0 else arena_map.counter(index, key)

    def keys(self) -> list[str]:
        """The keys of the counters in the arena, in table order.

        Every entry is checked (state, key length, stored hash against the
        key): a damaged one raises ArenaFormatError naming it, here as in
        values(), len(), get(), ``in`` and counter() when they meet it.
        """
        return [key.decode("utf-8", "replace") for _, key in self._live_map().keys()]

    def values(self) -> dict[str, int]:
        """Every counter's value, by key."""
        arena_map = self._live_map()
        out = {}
        for index, raw in arena_map.keys():
            key = raw.decode("utf-8", "replace")
            out[key] = arena_map.counter(index, key).value()
        return out

    def __contains__(self, key: object) -> bool:
        """False for anything that cannot be a key of this arena (not a str,
        empty, too long, not encodable), never an exception for those."""
        arena_map = self._live_map()
        if not isinstance(key, str):
            return False
        try:
            data = key.encode("utf-8")
        except UnicodeEncodeError:
            return False
        if not 1 <= len(data) <= self._layout.key_max:
            return False
        return arena_map.find(data, False) >= 0

    def __len__(self) -> int:
        return len(self._live_map().keys())

    # -- documented internals, for rseq.testing and the tests ----------------

    def _counter_through(self, module, key: str):
        """The counter under ``key`` (created if absent), built by
        ``module._ArenaMap`` over this arena's mapping: the stress harness
        passes the test build ``rseq._inject`` so that its injection points
        run inside the arena's counters.  Internal: for rseq.testing."""
        self._live_map()
        arena_map = self._build_map(module, self._mmap, self._layout, self._readonly)
        index = arena_map.find(_encode_key(key, self._layout.key_max), not self._readonly,
                               CLAIM_TIMEOUT)
        if index < 0:
            raise _core.ArenaError(f"arena {self._path!r} is open read-only: cannot create "
                                   f"counter {key!r}")
        return arena_map.counter(index, key)

    def _entry_states(self) -> list[tuple[str, int]]:
        """(state, claimant pid) of every entry, in table order: state is
        'empty', 'claimed', 'ready' or 'corrupt'; the pid is 0 unless
        claimed.  Internal: for rseq.testing and the tests."""
        arena_map = self._live_map()
        return [arena_map.entry_state(i)[:2] for i in range(self._layout.capacity)]

    @property
    def readonly(self) -> bool:
        """True if opened with readonly=True (mapped read-only)."""
        return self._readonly

    @property
    def path(self) -> str:
        return self._path

    @property
    def capacity(self) -> int:
        return self._layout.capacity

    @property
    def key_max(self) -> int:
        return self._layout.key_max

    @property
    def possible_cpus(self) -> int:
        return self._layout.possible_cpus

    @property
    def size(self) -> int:
        """Bytes mapped."""
        return self._layout.total_size

    @property
    def closed(self) -> bool:
        return self._map is None

    def close(self) -> None:
        """Drop this object's mapping.  Counters taken from the arena keep
        the memory mapped until they are gone themselves."""
        self._map = None
        self._mmap = None

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.capacity} counters"
        return f"<rseq.Arena {self._path!r} {state}>"
