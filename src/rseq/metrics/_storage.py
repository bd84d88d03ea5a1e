"""The metrics file: where every process's metrics live.

One file (``/dev/shm/NAME`` or a path) made and opened through
:mod:`rseq._shmfile` (owner-only, space reserved, published complete, opened
without following links and checked for owner and mode; read-only for an
exporter running as another user).  Layout, all offsets 64-byte aligned:

    page 0       the header (HeaderFormat: magic, version, layout, CRC32) and,
                 at MUTABLE, the words that change: the creation lock, the
                 catalog's published end, the allocation marks, the count of
                 series that could not be stored
    catalog      append-only records (u32 length + JSON): families with all
                 their metadata (type, help, unit, label names, buckets,
                 states, gauge mode), series (family, label values, first
                 word, creation time), gauge cells and exemplar cells of a
                 series.  A record never changes once published, so readers
                 (any process, and exporters that never imported the
                 application) read it without locks
    processes    per-process entries: pid, start time (rseq._procid), and a
                 generation bumped at each reuse
    cells        gauge cells: value, timestamp, generation (metric_words.h)
    exemplars    exemplar cells (metric_words.h)
    lanes        one fallback lane per word (atomics only)
    regions      per possible CPU, one 8-byte slot per word

Hot paths (inc, set, observe) touch only words, cells and exemplars, from
C, without any lock.  Everything rare (declaring a family, creating a
series, a cell or an exemplar, claiming a process entry) happens under one
lock word in the file that names its holder as (pid, start time): a holder
killed with ``kill -9`` is recognised as dead and the lock taken over; what
it had half-written lies past the published end and is written over.  A
holder that is alive but stopped makes creators wait at most
LOCK_TIMEOUT; then the series is not stored (see below), nobody blocks for
longer.

Capacity: a series, cell or exemplar that does not fit (or cannot be
created in time) is bound to private memory that is never exported, so the
application goes on unaffected; the loss is counted in the file and
exported as ``rseq_metrics_dropped_series_total``.
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator

from .. import _core, _procid, _shmfile

WHAT = "metrics file"
MAGIC = b"RSEQMTRC"
VERSION = 1
PAGE = 4096
ALIGN = 128
HEADER = _shmfile.HeaderFormat(MAGIC, VERSION, "IIQQQQQQQQQQQQQQ", WHAT)

# The words of page 0 that change after creation (not in the checksum).
MUTABLE = 2048
LOCK = MUTABLE
CATALOG_END = MUTABLE + 8
WORDS_USED = MUTABLE + 16
CELLS_USED = MUTABLE + 24
EXEMPLARS_USED = MUTABLE + 32
PROCESSES_USED = MUTABLE + 40
DROPPED = MUTABLE + 48

CELL_SIZE = 32
EXEMPLAR_SIZE = _core.METRIC_EXEMPLAR_LABELS + 32   # metric_words.h
PROCESS_SIZE = 32
RECORD = struct.Struct("<I")

DEFAULT_WORDS = 1 << 16
DEFAULT_CELLS = 1 << 14
DEFAULT_EXEMPLARS = 1 << 10
DEFAULT_PROCESSES = 1 << 12
DEFAULT_CATALOG = 4 << 20
LOCK_TIMEOUT = 2.0


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


class Dropped(Exception):
    """A series, cell or exemplar could not be stored (internal)."""


class Layout:
    """Where everything is, computed from the capacities alone, so a header
    that passes validation describes exactly the layout this version makes."""

    FIELDS = ("possible_cpus", "flags", "words", "cells", "exemplars", "processes",
              "catalog_size", "catalog_offset", "processes_offset", "cells_offset",
              "exemplars_offset", "lanes_offset", "regions_offset", "region_size",
              "total_size", "created_ns")

    def __init__(self, possible_cpus: int, words: int, cells: int, exemplars: int,
                 processes: int, catalog_size: int, created_ns: int = 0):
        self.possible_cpus = possible_cpus
        self.flags = 0
        self.words = words
        self.cells = cells
        self.exemplars = exemplars
        self.processes = processes
        self.catalog_size = catalog_size
        self.created_ns = created_ns
        self.catalog_offset = PAGE
        self.processes_offset = _round_up(self.catalog_offset + catalog_size, ALIGN)
        self.cells_offset = _round_up(self.processes_offset + processes * PROCESS_SIZE, ALIGN)
        self.exemplars_offset = _round_up(self.cells_offset + cells * CELL_SIZE, ALIGN)
        self.lanes_offset = _round_up(self.exemplars_offset + exemplars * EXEMPLAR_SIZE, ALIGN)
        self.regions_offset = _round_up(self.lanes_offset + words * 8, PAGE)
        # 128, not 64: x86 prefetches line pairs (see rseq._arena).
        self.region_size = _round_up(words * 8, ALIGN)
        self.total_size = self.regions_offset + possible_cpus * self.region_size

    def values(self) -> tuple:
        return tuple(getattr(self, f) for f in self.FIELDS)

    def pack(self) -> bytes:
        return HEADER.pack(*self.values())

    @classmethod
    def unpack(cls, data: bytes, file_size: int) -> Layout:
        err = _core.ArenaFormatError
        fields = dict(zip(cls.FIELDS, HEADER.unpack(data, file_size)))
        if fields["flags"] != 0:
            raise err(f"{WHAT} has unknown flags {fields['flags']:#x}")
        limits = {"possible_cpus": 1 << 16, "words": 1 << 28, "cells": 1 << 26,
                  "exemplars": 1 << 24, "processes": 1 << 22, "catalog_size": 1 << 32}
        for name, limit in limits.items():
            if not 1 <= fields[name] <= limit:
                raise err(f"{WHAT} header out of range: {name} {fields[name]}")
        layout = cls(fields["possible_cpus"], fields["words"], fields["cells"],
                     fields["exemplars"], fields["processes"], fields["catalog_size"],
                     fields["created_ns"])
        if layout.values() != tuple(fields[f] for f in cls.FIELDS):
            raise err(f"{WHAT} header layout is inconsistent with its own parameters")
        if layout.possible_cpus != _core.POSSIBLE_CPUS:
            raise err(f"{WHAT} made for {layout.possible_cpus} possible CPUs; this machine "
                      f"has {_core.POSSIBLE_CPUS}")
        if file_size < layout.total_size:
            raise err(f"truncated {WHAT}: {file_size} bytes, its layout needs "
                      f"{layout.total_size}")
        return layout


# ---------------------------------------------------------------------------
# Catalog records (what the index keeps of them)
# ---------------------------------------------------------------------------

class Family:
    __slots__ = ("id", "name", "type", "help", "unit", "labelnames", "buckets", "states",
                 "mode", "series")

    def __init__(self, record: dict):
        self.id = record["id"]
        self.name = record["name"]
        self.type = record["type"]
        self.help = record["help"]
        self.unit = record["unit"]
        self.labelnames = tuple(record["labels"])
        self.buckets = (tuple(bound_from_json(b) for b in record["buckets"])
                        if record.get("buckets") is not None else None)
        self.states = tuple(record["states"]) if record.get("states") is not None else None
        self.mode = record.get("mode")
        self.series: dict[tuple, Series] = {}     # the newest series per label values

    @classmethod
    def detached(cls, name: str, kind: str, documentation: str, unit: str, labelnames: tuple,
                 buckets: tuple | None = None, states: tuple | None = None,
                 mode: str | None = None) -> Family:
        """A family that is in no catalog (its declaration was dropped)."""
        return cls({"id": -1, "name": name, "type": kind, "help": documentation,
                    "unit": unit, "labels": list(labelnames),
                    "buckets": list(buckets) if buckets is not None else None,
                    "states": list(states) if states is not None else None, "mode": mode})

    def signature(self) -> dict:
        return {"type": self.type, "unit": self.unit, "labelnames": self.labelnames,
                "buckets": self.buckets, "states": self.states, "mode": self.mode}


class Series:
    __slots__ = ("id", "family", "values", "word", "nwords", "created", "cells", "exemplars",
                 "text", "created_text", "bucket_texts")

    def __init__(self, record: dict, family: Family):
        self.id = record["id"]
        self.family = family
        self.values = tuple(record["values"])
        self.word = record["word"]
        self.nwords = record["nwords"]
        self.created = record["created"]
        self.cells: dict[int, int] = {}          # process entry -> cell
        self.exemplars: dict[int, int] = {}      # bucket -> exemplar cell
        # Exposition text cached by the scrape (label set, creation time).
        self.text: str | None = None
        self.created_text = ""
        self.bucket_texts: list[str] | None = None

    @property
    def state_word(self) -> int:
        return self.word + self.nwords - 1


def words_for(kind: str, buckets: tuple | None) -> int:
    """Words of one series: its values, then one state word (its lane holds
    0 while the series is live, 1 once removed; an enum's lane of the word
    before it holds the current state)."""
    return {"counter": 3, "gauge": 1, "summary": 3, "info": 1, "stateset": 2,
            "histogram": (len(buckets) + 2) if buckets else 0}[kind]


# ---------------------------------------------------------------------------
# The storage
# ---------------------------------------------------------------------------

class Storage:
    """A mapped metrics file (shared) or private memory laid out the same
    way (process-local metrics, and the sink of series that were dropped)."""

    def __init__(self, path: str | None, mapping: mmap.mmap, layout: Layout, *,
                 readonly: bool = False, sink: bool = False):
        self.path = path
        self.shared = path is not None
        self.readonly = readonly
        self.sink = sink
        self.layout = layout
        self._mmap = mapping
        self.map = _core._MetricsMap(
            mapping, not readonly, layout.regions_offset, layout.region_size,
            layout.possible_cpus, layout.lanes_offset, layout.words, layout.cells_offset,
            layout.cells, layout.exemplars_offset, layout.exemplars)
        self._guard = threading.RLock()
        self._pos = 0
        self.families: dict[str, Family] = {}
        self.families_by_id: dict[int, Family] = {}
        self.series_by_id: dict[int, Series] = {}
        self._process: tuple[int, int] | None = None   # (entry, generation) of this process
        self._process_pid = 0

    # -- making and opening --------------------------------------------------

    @classmethod
    def create(cls, name: str | os.PathLike, *, words: int = DEFAULT_WORDS,
               cells: int = DEFAULT_CELLS, exemplars: int = DEFAULT_EXEMPLARS,
               processes: int = DEFAULT_PROCESSES,
               catalog_size: int = DEFAULT_CATALOG) -> Storage:
        layout = Layout(_core.POSSIBLE_CPUS, words, cells, exemplars, processes, catalog_size,
                        time.time_ns())
        path, mapping = _shmfile.create(name, layout.total_size, layout.pack(), what=WHAT)
        return cls(path, mapping, layout)

    @classmethod
    def open(cls, name: str | os.PathLike, *, readonly: bool = False,
             trust: object = None) -> Storage:
        path, mapping, layout = _shmfile.open_mapped(
            name, Layout.unpack, header_size=PAGE, readonly=readonly, trust=trust, what=WHAT)
        return cls(path, mapping, layout, readonly=readonly)

    @classmethod
    def open_or_create(cls, name: str | os.PathLike, **capacities) -> Storage:
        """Open the file, creating it if nobody has (races resolve to one)."""
        for _ in range(50):
            try:
                return cls.open(name)
            except FileNotFoundError:
                pass
            try:
                return cls.create(name, **capacities)
            except FileExistsError:
                continue
        raise _core.ArenaError(f"{WHAT} {name!r} keeps appearing and disappearing")

    @classmethod
    def private(cls, *, words: int = DEFAULT_WORDS, cells: int = 1024,
                exemplars: int = DEFAULT_EXEMPLARS, processes: int = 1,
                catalog_size: int = DEFAULT_CATALOG, sink: bool = False) -> Storage:
        """Process-private memory with the same layout (MAP_PRIVATE: a
        forked child gets its own copy, as with prometheus_client's default)."""
        layout = Layout(_core.POSSIBLE_CPUS, words, cells, exemplars, processes, catalog_size,
                        time.time_ns())
        mapping = mmap.mmap(-1, layout.total_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping[:HEADER.size] = layout.pack()
        return cls(None, mapping, layout, sink=sink)

    @property
    def size(self) -> int:
        return self.layout.total_size

    # -- the lock ----------------------------------------------------------------

    @staticmethod
    def _lock_word(pid: int, started: int) -> int:
        return (started & 0xFFFFFFFF) << 32 | pid

    @staticmethod
    def _holder_alive(word: int) -> bool:
        pid, started = word & 0xFFFFFFFF, word >> 32
        found = _procid.start_time(pid)
        return found is not None and (found & 0xFFFFFFFF) == started

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The creation lock: held for microseconds by one thread of one
        process; taken over from a dead holder; Dropped after LOCK_TIMEOUT."""
        if self.readonly:
            raise PermissionError(f"{WHAT} {self.path!r} is open read-only")
        if not self._guard.acquire(timeout=LOCK_TIMEOUT):
            raise Dropped("another thread of this process holds the creation lock")
        try:
            me = self._lock_word(*_procid.identity())
            deadline = time.monotonic() + LOCK_TIMEOUT
            delay = 0.0001
            while not self.map.cas(LOCK, 0, me):
                holder = self.map.load(LOCK)
                if holder == me:
                    # Left by this very process before a fork, or by a thread
                    # that died holding it: nobody else can be using it.
                    break
                if holder and not self._holder_alive(holder):
                    if self.map.cas(LOCK, holder, me):
                        break
                    continue
                if time.monotonic() > deadline:
                    raise Dropped(f"the creation lock of {WHAT} {self.path!r} has been held "
                                  f"by live process {holder & 0xFFFFFFFF} for more than "
                                  f"{LOCK_TIMEOUT:g} s (stopped?)")
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
            try:
                self.refresh()
                yield
            finally:
                self.map.cas(LOCK, me, 0)
        finally:
            self._guard.release()

    def after_fork_in_child(self) -> None:
        self._guard = threading.RLock()
        self._process = None

    # -- the catalog -----------------------------------------------------------

    def refresh(self) -> None:
        """Read the records published since the last call."""
        with self._guard:
            end = self.map.load(CATALOG_END)
            limit = self.layout.catalog_size
            if end > limit:
                raise _core.ArenaFormatError(f"{WHAT} catalog end {end} is past its size "
                                             f"{limit}")
            base = self.layout.catalog_offset
            while self._pos < end:
                pos = self._pos
                if pos + RECORD.size > end:
                    raise self._damaged(pos, "truncated record")
                (length,) = RECORD.unpack_from(self._mmap, base + pos)
                if length <= RECORD.size or pos + length > end:
                    raise self._damaged(pos, f"record length {length}")
                try:
                    record = json.loads(self._mmap[base + pos + RECORD.size:base + pos + length])
                    self._index(record)
                except (ValueError, KeyError, TypeError, IndexError) as e:
                    raise self._damaged(pos, f"{type(e).__name__}: {e}") from None
                self._pos = pos + length

    def _damaged(self, pos: int, why: str) -> Exception:
        return _core.ArenaFormatError(f"{WHAT} {self.path or '(private)'}: catalog record at "
                                      f"{pos} is damaged ({why})")

    def _index(self, record: dict) -> None:
        kind = record["k"]
        if kind == "f":
            family = Family(record)
            if family.id != len(self.families_by_id) or family.name in self.families:
                raise ValueError(f"family {family.name!r} out of order")
            if family.type == "histogram" and not family.buckets:
                raise ValueError("histogram without buckets")
            self.families[family.name] = family
            self.families_by_id[family.id] = family
        elif kind == "s":
            family = self.families_by_id[record["family"]]
            series = Series(record, family)
            if (series.id != len(self.series_by_id) or series.word < 0
                    or series.nwords != words_for(family.type, family.buckets)
                    or series.word + series.nwords > self.layout.words
                    or len(series.values) != len(family.labelnames) + (family.type == "info")
                    or not all(isinstance(v, str) for v in series.values)):
                raise ValueError(f"series {series.id} inconsistent")
            self.series_by_id[series.id] = series
            family.series[series.values] = series
        elif kind == "c":
            series = self.series_by_id[record["series"]]
            process, cell = record["process"], record["cell"]
            if not (0 <= process < self.layout.processes and 0 <= cell < self.layout.cells):
                raise ValueError("cell out of range")
            series.cells[process] = cell
        elif kind == "e":
            series = self.series_by_id[record["series"]]
            bucket, cell = record["bucket"], record["cell"]
            if not 0 <= cell < self.layout.exemplars:
                raise ValueError("exemplar out of range")
            series.exemplars[bucket] = cell
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    def _append(self, record: dict) -> None:
        """Publish a record (under the lock)."""
        data = json.dumps(record, separators=(",", ":")).encode()
        length = RECORD.size + len(data)
        end = self.map.load(CATALOG_END)
        if end + length > self.layout.catalog_size:
            raise Dropped(f"the catalog of {WHAT} {self.path!r} is full")
        at = self.layout.catalog_offset + end
        self._mmap[at:at + length] = RECORD.pack(length) + data
        self.map.store(CATALOG_END, end + length)
        self.refresh()

    def _allocate(self, mark: int, count: int, capacity: int, what: str) -> int:
        used = self.map.load(mark)
        if used + count > capacity:
            if self.sink:   # never exported: wrap around
                used = 0
            else:
                raise Dropped(f"{WHAT} {self.path!r} has no room for more {what} "
                              f"({capacity}); create it with more")
        self.map.store(mark, used + count)
        return used

    # -- declaring and creating ------------------------------------------------

    def declare(self, name: str, kind: str, documentation: str, unit: str,
                labelnames: tuple, buckets: tuple | None = None, states: tuple | None = None,
                mode: str | None = None) -> Family:
        """The family `name`, declared now if new; ValueError if it exists
        with a different type, unit, label names, buckets, states or mode."""
        wanted = {"type": kind, "unit": unit, "labelnames": tuple(labelnames),
                  "buckets": tuple(buckets) if buckets is not None else None,
                  "states": tuple(states) if states is not None else None, "mode": mode}
        self.refresh()
        family = self.families.get(name)
        if family is None:
            with self.locked():
                family = self.families.get(name)
                if family is None:
                    self._append({"k": "f", "id": len(self.families_by_id), "name": name,
                                  "type": kind, "help": documentation, "unit": unit,
                                  "labels": list(labelnames),
                                  "buckets": [_bound_json(b) for b in buckets]
                                  if buckets is not None else None,
                                  "states": list(states) if states is not None else None,
                                  "mode": mode})
                    family = self.families[name]
        found = family.signature()
        if found != wanted:
            differences = ", ".join(f"{key} {found[key]!r} (not {wanted[key]!r})"
                                    for key in wanted if found[key] != wanted[key])
            raise ValueError(f"metric {name!r} is already declared in {WHAT} "
                             f"{self.path or '(private)'} with {differences}: every process "
                             f"must declare it the same way")
        return family

    def series(self, family: Family, values: tuple) -> Series:
        """The live series of `family` with these label values, created if
        there is none (or the last one was removed).  Dropped if no room."""
        self.refresh()
        series = family.series.get(values)
        if series is not None and not self.removed(series):
            return series
        with self.locked():
            series = family.series.get(values)
            if series is not None and not self.removed(series):
                return series
            nwords = words_for(family.type, family.buckets)
            word = self._allocate(WORDS_USED, nwords, self.layout.words, "words")
            self._append({"k": "s", "id": len(self.series_by_id), "family": family.id,
                          "values": list(values), "word": word, "nwords": nwords,
                          "created": time.time()})
            return family.series[values]

    def removed(self, series: Series) -> bool:
        return self.map.load(self.layout.lanes_offset + series.state_word * 8) == 1

    def remove(self, series: Series) -> None:
        self.map.store(self.layout.lanes_offset + series.state_word * 8, 1)

    def lane(self, word: int) -> int:
        return self.map.load(self.layout.lanes_offset + word * 8)

    def set_lane(self, word: int, value: int) -> None:
        self.map.store(self.layout.lanes_offset + word * 8, value)

    # -- processes and gauge cells ---------------------------------------------

    def _process_entry(self, index: int) -> tuple[int, int, int]:
        at = self.layout.processes_offset + index * PROCESS_SIZE
        return self.map.load(at), self.map.load(at + 8), self.map.load(at + 16)

    def processes(self) -> list[tuple[int, int, int, int]]:
        """(entry, pid, start time, generation) of every entry ever used."""
        used = min(self.map.load(PROCESSES_USED), self.layout.processes)
        return [(i, *self._process_entry(i)) for i in range(used)]

    def _my_process(self) -> tuple[int, int]:
        """This process's entry and generation, claimed under the lock on
        first use: a free entry, or one whose process is dead (reused, so
        space does not grow with process churn)."""
        pid, started = _procid.identity()
        if self._process is not None and self._process_pid == pid:
            return self._process
        if not self.shared:
            self._process, self._process_pid = (0, 1), pid
            return self._process
        with self.locked():
            chosen = None
            for index, owner, owner_start, _gen in self.processes():
                if owner == 0 or not _procid.alive(owner, owner_start):
                    chosen = index
                    break
            if chosen is None:
                chosen = self._allocate(PROCESSES_USED, 1, self.layout.processes,
                                        "process entries")
            at = self.layout.processes_offset + chosen * PROCESS_SIZE
            gen = self.map.load(at + 16) + 1
            self.map.store(at, 0)
            self.map.store(at + 16, gen)
            self.map.store(at + 8, started)
            self.map.store(at, pid)
            self._process, self._process_pid = (chosen, gen), pid
            return self._process

    def gauge_cell(self, series: Series) -> int:
        """This process's cell of a gauge series, zeroed when it is first
        used by this process (a reused cell held a dead process's value)."""
        entry, gen = self._my_process()
        cell = series.cells.get(entry)
        if cell is not None and self.map.read_cell(cell)[2] == gen:
            return cell
        with self.locked():
            cell = series.cells.get(entry)
            if cell is None:
                cell = self._allocate(CELLS_USED, 1, self.layout.cells, "gauge cells")
                self.map.reset_cell(cell, gen)
                self._append({"k": "c", "series": series.id, "process": entry, "cell": cell})
            elif self.map.read_cell(cell)[2] != gen:
                self.map.reset_cell(cell, gen)
            return cell

    def exemplar_cell(self, series: Series, bucket: int) -> int:
        self.refresh()
        cell = series.exemplars.get(bucket)
        if cell is not None:
            return cell
        with self.locked():
            cell = series.exemplars.get(bucket)
            if cell is None:
                cell = self._allocate(EXEMPLARS_USED, 1, self.layout.exemplars, "exemplars")
                self._append({"k": "e", "series": series.id, "bucket": bucket, "cell": cell})
            return cell

    def sink_words(self, count: int) -> int:
        """Private words for a series that was not stored (sink only)."""
        with self._guard:
            return self._allocate(WORDS_USED, count, self.layout.words, "words")

    def sink_cell(self) -> int:
        with self._guard:
            cell = self._allocate(CELLS_USED, 1, self.layout.cells, "gauge cells")
            self.map.reset_cell(cell, 1)
            return cell

    def count_dropped(self) -> None:
        if not self.readonly:
            self.map.fetch_add(DROPPED, 1)

    def dropped(self) -> int:
        return self.map.load(DROPPED)

    def usage(self) -> dict[str, tuple[int, int]]:
        return {"words": (self.map.load(WORDS_USED), self.layout.words),
                "cells": (self.map.load(CELLS_USED), self.layout.cells),
                "exemplars": (self.map.load(EXEMPLARS_USED), self.layout.exemplars),
                "processes": (self.map.load(PROCESSES_USED), self.layout.processes),
                "catalog bytes": (self.map.load(CATALOG_END), self.layout.catalog_size)}


def _bound_json(bound: float) -> float | str:
    """JSON has no infinity: +Inf is stored as the string "+Inf"."""
    return "+Inf" if math.isinf(bound) and bound > 0 else float(bound)


def bound_from_json(bound: float | str) -> float:
    return math.inf if bound == "+Inf" else float(bound)
