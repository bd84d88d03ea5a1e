"""The prometheus_client-compatible metric classes, the registry, and the
collection of families from storage.

Counter, Gauge, Histogram and Summary subclass C base types
(``rseq._core._CounterBase`` ...) whose ``inc``, ``set``, ``observe`` and
``labels`` are C methods: the hot path never runs a Python frame.  What is
rare or unusual (validation of odd argument types, exemplars, creating a
child, an unbound parent) goes to the ``_*_slow`` Python methods.
"""
from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .. import _core, _procid
from . import _storage
from ._exposition import Exemplar, Metric, Sample
from ._storage import Dropped, Storage

INF = math.inf
DEFAULT_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0, INF)
GAUGE_MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
               "mostrecent", "livemostrecent")
METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DROPPED_NAME = "rseq_metrics_dropped_series"


# ---------------------------------------------------------------------------
# Where metrics live
# ---------------------------------------------------------------------------

class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.name: str | None = None
        self.capacities: dict[str, int] = {}
        self.storage: Storage | None = None
        self.sink: Storage | None = None


_state = _State()


def configure(name: str | os.PathLike | None = None, **capacities: int) -> None:
    """Name the shared metrics file (as the RSEQ_METRICS environment variable
    does) before the first metric is created.  Every process that uses the
    same name shares the metrics; ``generate_latest()`` in any of them
    renders all of them.  Without a name (and without RSEQ_METRICS) metrics
    are process-local, as prometheus_client's default.

    ``capacities`` (used only when this call creates the file): ``words``
    (8-byte per-CPU words: a counter takes 3, a histogram its buckets + 2),
    ``cells`` (gauge values: one per series per process), ``exemplars``,
    ``processes``, ``catalog_size`` (bytes of metadata).
    """
    allowed = {"words", "cells", "exemplars", "processes", "catalog_size"}
    unknown = set(capacities) - allowed
    if unknown:
        raise TypeError(f"configure() got unknown capacities: {sorted(unknown)}")
    with _state.lock:
        text = os.fspath(name) if name is not None else None
        if _state.storage is not None:
            if _state.name == text and _state.capacities == capacities:
                return
            raise RuntimeError("rseq.metrics.configure() must be called before the first "
                               f"metric is created (metrics already live in "
                               f"{_state.storage.path or 'process-local memory'})")
        _state.name = text
        _state.capacities = dict(capacities)


def storage() -> Storage:
    """The storage of this process's metrics (opened on first use)."""
    st = _state.storage
    if st is not None:
        return st
    with _state.lock:
        if _state.storage is None:
            name = _state.name or os.environ.get("RSEQ_METRICS") or None
            _state.name = name
            if name:
                _state.storage = Storage.open_or_create(name, **_state.capacities)
            else:
                _state.storage = Storage.private()
        return _state.storage


def _sink() -> Storage:
    """Private memory where series that could not be stored are kept (never
    exported)."""
    with _state.lock:
        if _state.sink is None:
            _state.sink = Storage.private(words=1 << 17, cells=4096, exemplars=1,
                                          catalog_size=4096, sink=True)
        return _state.sink


def _after_fork_in_child() -> None:
    _state.lock = threading.RLock()
    for st in (_state.storage, _state.sink):
        if st is not None:
            st.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# Validation (prometheus_client's rules)
# ---------------------------------------------------------------------------

def _full_name(kind: str, name: str, namespace: str, subsystem: str, unit: str) -> str:
    if not name:
        raise ValueError("Metric name should not be empty")
    full = "".join(f"{part}_" for part in (namespace, subsystem) if part) + name
    if kind == "counter" and full.endswith("_total"):
        full = full[:-6]
    if unit and not full.endswith("_" + unit):
        full += "_" + unit
    if unit and kind in ("info", "stateset"):
        raise ValueError(f"Metric name is of a type that cannot have a unit: {full}")
    if not METRIC_NAME_RE.match(full):
        raise ValueError(f"Invalid metric name: {full}")
    return full


def _validate_labelname(name: object) -> None:
    if not isinstance(name, str) or not LABEL_NAME_RE.match(name):
        raise ValueError(f"Invalid label metric name: {name}")
    if name.startswith("__"):
        raise ValueError(f"Reserved label metric name: {name}")


def _validate_exemplar(exemplar: dict) -> None:
    runes = 0
    for key, value in exemplar.items():
        _validate_labelname(key)
        if not isinstance(value, str):
            raise ValueError(f"Exemplar label values must be str, not {type(value).__name__}")
        runes += len(key) + len(value)
    if runes > 128:
        raise ValueError(f"Exemplar labels have {runes} UTF-8 characters, exceeding the "
                         f"limit of 128")


def _observation(value: object) -> float:
    number = _float(value, "amount")
    if math.isnan(number):
        raise ValueError("cannot observe NaN: it would make the sum NaN, which OpenMetrics "
                         "forbids")
    return number


def _float(value: object, what: str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}") from None


# ---------------------------------------------------------------------------
# Timers and decorators
# ---------------------------------------------------------------------------

class _Timer:
    """Context manager and decorator that reports elapsed seconds."""

    def __init__(self, report: Callable[[float], None]):
        self._report = report
        self._start = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._report(max(time.perf_counter() - self._start, 0.0))

    def labels(self, *args, **kwargs):   # prometheus_client allows timer.labels() on parents
        raise ValueError("call .labels() on the metric before .time()")

    def __call__(self, fn):
        return _decorate(fn, lambda: _Timer(self._report))


class _Guard:
    """Context manager and decorator around a pair of calls."""

    def __init__(self, enter: Callable[[], None], leave: Callable[[BaseException | None], None]):
        self._enter = enter
        self._leave = leave

    def __enter__(self):
        self._enter()
        return self

    def __exit__(self, typ, value, tb):
        self._leave(value)
        return False

    def __call__(self, fn):
        return _decorate(fn, lambda: _Guard(self._enter, self._leave))


def _decorate(fn, make):
    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args, **kwargs):
            with make():
                return await fn(*args, **kwargs)
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with make():
            return fn(*args, **kwargs)
    return wrapper


# ---------------------------------------------------------------------------
# The common part of every metric
# ---------------------------------------------------------------------------

# Attributes of every metric: the C-based classes keep them in __slots__
# (no instance dict: ``c.inc`` is then the fastest attribute lookup CPython
# has, the same for a parent and a child built by labels()).
_COMMON_SLOTS = ("_name", "_documentation", "_unit", "_labelnames", "_labelvalues", "_store",
                 "_family", "_children_lock", "_parent", "_series", "__weakref__")


class _Family:
    __slots__ = ()
    _type = ""
    _storage_type = ""
    _reserved_labelnames: tuple[str, ...] = ()

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: Any = None, _labelvalues: Any = None, **options: Any):
        self._name = _full_name(self._storage_type, name, namespace, subsystem, unit)
        if not isinstance(documentation, str):
            raise TypeError("documentation must be str")
        self._documentation = documentation
        self._unit = unit
        if isinstance(labelnames, str):
            labelnames = (labelnames,)
        labelnames = tuple(labelnames)
        for label in labelnames:
            _validate_labelname(label)
            if label in self._reserved_labelnames:
                raise ValueError(f"Reserved label metric name: {label}")
        self._labelnames = labelnames
        self._labelvalues: tuple[str, ...] = ()
        self._options(**options)
        self._store = storage()
        try:
            self._declare(self._store)
        except Dropped:
            self._store.count_dropped()
            self._store = _sink()
            self._family = _storage.Family.detached(
                self._name, self._storage_type, self._documentation, self._unit,
                self._labelnames, **self._declaration())
        self._children = {} if labelnames else None
        self._children_lock = threading.Lock()
        self._parent: _Family | None = None
        if not labelnames:
            self._bind()
        if registry is not None:
            registry.register(self)

    def _options(self) -> None:
        pass

    def _declare(self, st: Storage) -> None:
        self._family = st.declare(self._name, self._storage_type, self._documentation,
                                  self._unit, self._labelnames, **self._declaration())

    def _declaration(self) -> dict:
        return {}

    # -- children -----------------------------------------------------------

    def labels(self, *labelvalues: Any, **labelkwargs: Any):
        return self._labels_slow(*labelvalues, **labelkwargs)

    def _forget_children(self) -> None:
        pass

    def _labels_slow(self, *labelvalues: Any, **labelkwargs: Any):
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self!r}")
        if self._labelvalues:
            raise ValueError(f"{self!r} already has labels set ({self._labelvalues}); can "
                             f"not chain calls to .labels()")
        if labelvalues and labelkwargs:
            raise ValueError("Can't pass both *args and **kwargs")
        if labelkwargs:
            if sorted(labelkwargs) != sorted(self._labelnames):
                raise ValueError("Incorrect label names")
            labelvalues = tuple(labelkwargs[name] for name in self._labelnames)
        elif len(labelvalues) != len(self._labelnames):
            raise ValueError(f"Incorrect label count (expected {len(self._labelnames)}, got "
                             f"{len(labelvalues)})")
        values = tuple(str(v) for v in labelvalues)
        with self._children_lock:
            child = self._children.get(values)
            if child is None:
                child = type(self).__new__(type(self))
                child._init_child(self, values)
                self._children[values] = child
            return child

    def _init_child(self, parent: _Family, values: tuple[str, ...]) -> None:
        for attr in ("_name", "_documentation", "_unit", "_labelnames", "_store", "_family",
                     *self._child_attributes()):
            setattr(self, attr, getattr(parent, attr))
        self._labelvalues = values
        self._children = None
        self._children_lock = threading.Lock()
        self._parent = parent
        self._bind()

    def _child_attributes(self) -> tuple[str, ...]:
        return ()

    def remove(self, *labelvalues: Any) -> None:
        """Remove a child: its series disappears from every process's
        exposition; labels() with the same values starts a new one at zero."""
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self!r}")
        if len(labelvalues) != len(self._labelnames):
            raise ValueError(f"Incorrect label count (expected {len(self._labelnames)}, got "
                             f"{labelvalues})")
        values = tuple(str(v) for v in labelvalues)
        with self._children_lock:
            child = self._children.pop(values, None)
            self._forget_children()
        self._remove_series(values, child)

    def _remove_series(self, values: tuple[str, ...], child: Any) -> None:
        st = self._store
        st.refresh()
        series = getattr(child, "_series", None) or self._family.series.get(values)
        if series is not None and not st.readonly:
            st.remove(series)

    def clear(self) -> None:
        """Remove every child (in every process's exposition)."""
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self!r}")
        with self._children_lock:
            self._children.clear()
            self._forget_children()
        st = self._store
        st.refresh()
        if not st.readonly:
            for series in list(self._family.series.values()):
                st.remove(series)

    # -- storage ------------------------------------------------------------

    def _bind(self) -> None:
        st = self._store
        try:
            if st.sink:
                raise Dropped("sink")
            self._series = st.series(self._family, self._series_values())
            self._attach(st, self._series)
        except Dropped:
            if not st.sink:
                st.count_dropped()
            # Private words or a private cell, outside any catalog, reused
            # round-robin: never exported, and never able to fail.
            self._series = None
            self._attach_sink(_sink())

    def _attach_sink(self, sink: Storage) -> None:
        raise NotImplementedError

    def _series_values(self) -> tuple[str, ...]:
        return self._labelvalues

    def _attach(self, st: Storage, series: _storage.Series) -> None:
        raise NotImplementedError

    def _unbound_error(self) -> ValueError:
        return ValueError(f"{self._type} metric is missing label values")

    # -- collection ---------------------------------------------------------

    def describe(self) -> list[Metric]:
        return [Metric(self._name, self._documentation, self._storage_type, self._unit)]

    def collect(self) -> list[Metric]:
        st = self._store
        if st.sink:     # the declaration itself could not be stored: not exported
            return []
        st.refresh()
        return [collect_family(st, self._family, _Liveness(st), name=self._name)]

    def _names(self) -> list[str]:
        suffixes = {"counter": ("_total", "_created", ""),
                    "gauge": ("",),
                    "histogram": ("_bucket", "_count", "_sum", "_created", ""),
                    "summary": ("_count", "_sum", "_created", ""),
                    "info": ("_info",),
                    "stateset": ("",)}[self._storage_type]
        return [self._name + s for s in suffixes]

    def __repr__(self) -> str:
        return f"{type(self).__module__}.{type(self).__name__}({self._name})"


# ---------------------------------------------------------------------------
# Counter
# ---------------------------------------------------------------------------

class Counter(_core._CounterBase, _Family):
    """A monotonically increasing value: ``inc(amount=1, exemplar=None)``.

    Same constructor as prometheus_client's Counter; a name ending in
    ``_total`` loses the suffix in the family name.  Integer increments are
    exact 64-bit per-CPU counts; float increments go to a float sum beside
    them; the value is their total.
    """

    __slots__ = _COMMON_SLOTS
    _type = "counter"
    _storage_type = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: Any = ..., _labelvalues: Any = None):
        _Family.__init__(self, name, documentation, labelnames, namespace, subsystem, unit,
                         _default_registry(registry))

    def _attach(self, st: Storage, series: _storage.Series) -> None:
        self._bind_counter(st.map, series.word)

    def _attach_sink(self, sink: Storage) -> None:
        self._bind_counter(sink.map, sink.sink_words(3))

    def _inc_slow(self, amount: Any = 1, exemplar: dict | None = None) -> None:
        if not self._bound:
            raise self._unbound_error()
        if (isinstance(amount, bool) or not isinstance(amount, int)
                or not -2**63 <= amount < 2**63):
            amount = _float(amount, "amount")
        if amount != amount:
            raise ValueError("Counters cannot be incremented by NaN (OpenMetrics forbids "
                             "NaN counters).")
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        if exemplar:
            _validate_exemplar(exemplar)
        self.inc(amount)
        if exemplar:
            _write_exemplar(self, 0, exemplar, float(amount))

    def count_exceptions(self, exception: type[BaseException] | tuple = Exception) -> _Guard:
        """Count exceptions of the given type raised in a block or function."""
        if not self._bound:
            raise self._unbound_error()

        def leave(error: BaseException | None) -> None:
            if error is not None and isinstance(error, exception):
                self.inc()
        return _Guard(lambda: None, leave)

    def _child_attributes(self) -> tuple[str, ...]:
        return ()


# ---------------------------------------------------------------------------
# Gauge
# ---------------------------------------------------------------------------

class Gauge(_core._GaugeBase, _Family):
    """A value that goes up and down: ``set``, ``inc``, ``dec``,
    ``set_to_current_time``, ``track_inprogress``, ``time``,
    ``set_function``.

    With a shared metrics file each process has its own value (its entry:
    pid and start time), combined at scrape time by ``multiprocess_mode``,
    prometheus_client's ten modes: ``all`` (one series per process, with a
    ``pid`` label; the default), ``liveall``, ``min``, ``livemin``, ``max``,
    ``livemax``, ``sum``, ``livesum``, ``mostrecent``, ``livemostrecent``.
    The live modes leave out processes that have exited or been killed, at
    the next scrape, without any hook.
    """

    __slots__ = (*_COMMON_SLOTS, "_multiprocess_mode", "_function")
    _type = "gauge"
    _storage_type = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: Any = ..., _labelvalues: Any = None,
                 multiprocess_mode: str = "all"):
        _Family.__init__(self, name, documentation, labelnames, namespace, subsystem, unit,
                         _default_registry(registry), multiprocess_mode=multiprocess_mode)

    def _options(self, multiprocess_mode: str = "all") -> None:
        if multiprocess_mode not in GAUGE_MODES:
            raise ValueError(f"Invalid multiprocess mode: {multiprocess_mode}")
        self._multiprocess_mode = multiprocess_mode
        self._function: Callable[[], float] | None = None

    def _declaration(self) -> dict:
        return {"mode": self._multiprocess_mode}

    def _child_attributes(self) -> tuple[str, ...]:
        return ("_multiprocess_mode",)

    def _init_child(self, parent: _Family, values: tuple[str, ...]) -> None:
        self._function = None
        _Family._init_child(self, parent, values)

    def _attach(self, st: Storage, series: _storage.Series) -> None:
        cell = st.gauge_cell(series)
        self._bind_gauge(st.map, cell, self._multiprocess_mode.endswith("mostrecent"))

    def _attach_sink(self, sink: Storage) -> None:
        self._bind_gauge(sink.map, sink.sink_cell(), False)

    def _rebind(self) -> None:
        """After fork(): this process's own cell (its values start at zero,
        as with prometheus_client's multiprocess mode)."""
        self._bind()

    def _set_slow(self, value: Any = None) -> None:
        if not self._bound:
            raise self._unbound_error()
        self.set(_float(value, "value"))

    def _inc_slow(self, amount: Any = 1) -> None:
        if not self._bound:
            raise self._unbound_error()
        self.inc(_float(amount, "amount"))

    def _dec_slow(self, amount: Any = 1) -> None:
        if not self._bound:
            raise self._unbound_error()
        self.dec(_float(amount, "amount"))

    def track_inprogress(self) -> _Guard:
        """Add 1 while a block or function runs."""
        if not self._bound:
            raise self._unbound_error()
        return _Guard(self.inc, lambda error: self.dec())

    def time(self) -> _Timer:
        """Set the gauge to the duration of a block or function, in seconds."""
        if not self._bound:
            raise self._unbound_error()
        return _Timer(self.set)

    def set_function(self, f: Callable[[], float]) -> None:
        """Take the value from ``f()`` at each scrape by this process (other
        processes see the value of this process's last scrape)."""
        if not self._bound:
            raise self._unbound_error()
        self._function = f

    def _refresh_function(self) -> None:
        if self._function is not None:
            self.set(float(self._function()))


# ---------------------------------------------------------------------------
# Histogram and Summary
# ---------------------------------------------------------------------------

class Histogram(_core._ObserveBase, _Family):
    """Observations counted in cumulative buckets: ``observe(amount,
    exemplar=None)``, ``time()``.  Bucket counts are exact 64-bit per-CPU
    counts; the sum is a float per CPU."""

    __slots__ = (*_COMMON_SLOTS, "_upper_bounds")
    _type = "histogram"
    _storage_type = "histogram"
    _reserved_labelnames = ("le",)
    DEFAULT_BUCKETS = DEFAULT_BUCKETS

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: Any = ..., _labelvalues: Any = None,
                 buckets: Iterable[float] = DEFAULT_BUCKETS):
        _Family.__init__(self, name, documentation, labelnames, namespace, subsystem, unit,
                         _default_registry(registry), buckets=buckets)

    def _options(self, buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        bounds = [_float(b, "bucket bound") for b in buckets]
        if any(math.isnan(b) for b in bounds):
            raise ValueError("Bucket bounds must not be NaN")
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds and bounds[-1] != INF:
            bounds.append(INF)
        if len(bounds) < 2:
            raise ValueError("Must have at least two buckets")
        if len(set(bounds)) != len(bounds):
            raise ValueError("Bucket bounds must be distinct")
        self._upper_bounds = tuple(bounds)

    def _declaration(self) -> dict:
        return {"buckets": self._upper_bounds}

    def _child_attributes(self) -> tuple[str, ...]:
        return ("_upper_bounds",)

    def _attach(self, st: Storage, series: _storage.Series) -> None:
        self._bind_observe(st.map, series.word, self._upper_bounds, False)

    def _attach_sink(self, sink: Storage) -> None:
        self._bind_observe(sink.map, sink.sink_words(len(self._upper_bounds) + 2),
                           self._upper_bounds, False)

    def _observe_slow(self, amount: Any = None, exemplar: dict | None = None) -> None:
        if not self._bound:
            raise self._unbound_error()
        value = _observation(amount)
        if exemplar:
            _validate_exemplar(exemplar)
        self.observe(value)
        if exemplar:
            for bucket, bound in enumerate(self._upper_bounds):
                if value <= bound:
                    _write_exemplar(self, bucket, exemplar, value)
                    break

    def time(self) -> _Timer:
        """Observe the duration of a block or function, in seconds."""
        if not self._bound:
            raise self._unbound_error()
        return _Timer(self.observe)


class Summary(_core._ObserveBase, _Family):
    """Count and sum of observations (no quantiles, as prometheus_client):
    ``observe(amount)``, ``time()``."""

    __slots__ = _COMMON_SLOTS
    _type = "summary"
    _storage_type = "summary"
    _reserved_labelnames = ("quantile",)

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: Any = ..., _labelvalues: Any = None):
        _Family.__init__(self, name, documentation, labelnames, namespace, subsystem, unit,
                         _default_registry(registry))

    def _attach(self, st: Storage, series: _storage.Series) -> None:
        self._bind_observe(st.map, series.word, (INF,), True)

    def _attach_sink(self, sink: Storage) -> None:
        self._bind_observe(sink.map, sink.sink_words(3), (INF,), True)

    def _observe_slow(self, amount: Any = None) -> None:
        if not self._bound:
            raise self._unbound_error()
        self.observe(_observation(amount))

    def time(self) -> _Timer:
        if not self._bound:
            raise self._unbound_error()
        return _Timer(self.observe)


for _cls in (Counter, Gauge, Histogram, Summary):
    _core._specialize_metric_methods(_cls)


# ---------------------------------------------------------------------------
# Info and Enum
# ---------------------------------------------------------------------------

class Info(_Family):
    """Key-value information about the target: ``info(dict)``; exposed as
    ``NAME_info{...} 1``.  Shared across processes: the last ``info()``
    wins."""

    __slots__ = ("__dict__",)
    _type = "info"
    _storage_type = "info"

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: Any = ..., _labelvalues: Any = None):
        _Family.__init__(self, name, documentation, labelnames, namespace, subsystem, unit,
                         _default_registry(registry))

    def _bind(self) -> None:
        self._series = None
        st = self._store
        st.refresh()
        if not any(s.values[:-1] == self._labelvalues and not st.removed(s)
                   for s in self._family.series.values()):
            self._set({})

    def _attach(self, st: Storage, series: _storage.Series) -> None:
        pass

    def info(self, val: dict[str, str]) -> None:
        """Set the key-value pairs (label names and str values)."""
        if self._labelnames and not self._labelvalues:
            raise self._unbound_error()
        if not isinstance(val, dict):
            raise TypeError("info() takes a dict of str")
        if set(val) & set(self._labelnames):
            raise ValueError(f"Overlapping labels for Info metric, metric: "
                             f"{self._labelnames} child: {val}")
        for key, value in val.items():
            _validate_labelname(key)
            if not isinstance(value, str):
                raise ValueError(f"Info values must be str, not {type(value).__name__}")
        self._set(val)

    def _set(self, val: dict[str, str]) -> None:
        st = self._store
        encoded = json.dumps(dict(sorted(val.items())), separators=(",", ":"))
        values = (*self._labelvalues, encoded)
        try:
            if st.sink:
                raise Dropped("sink")
            series = st.series(self._family, values)
        except Dropped:
            if not st.sink:
                st.count_dropped()
            return
        for other in list(self._family.series.values()):
            if other is not series and other.values[:-1] == self._labelvalues:
                st.remove(other)
        self._series = series

    def _remove_series(self, values: tuple[str, ...], child: Any) -> None:
        st = self._store
        st.refresh()
        for series in list(self._family.series.values()):
            if series.values[:-1] == values:
                st.remove(series)


class Enum(_Family):
    """One of a set of states: ``state(name)``; exposed as an OpenMetrics
    stateset (a gauge per state in text 0.0.4).  Shared across processes:
    the last ``state()`` wins."""

    __slots__ = ("__dict__",)
    _type = "enum"
    _storage_type = "stateset"

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: Any = ..., _labelvalues: Any = None,
                 states: Iterable[str] | None = None):
        if isinstance(labelnames, str):
            labelnames = (labelnames,)
        full = _full_name("stateset", name, namespace, subsystem, unit)
        if full in tuple(labelnames):
            raise ValueError(f"Overlapping labels for Enum metric: {full}")
        _Family.__init__(self, name, documentation, labelnames, namespace, subsystem, unit,
                         _default_registry(registry), states=states)

    def _options(self, states: Iterable[str] | None = None) -> None:
        if not states:
            raise ValueError(f"No states provided for Enum metric: {self._name}")
        self._states = tuple(states)
        if not all(isinstance(s, str) for s in self._states):
            raise ValueError("Enum states must be str")

    def _declaration(self) -> dict:
        return {"states": self._states}

    def _child_attributes(self) -> tuple[str, ...]:
        return ("_states",)

    def _attach(self, st: Storage, series: _storage.Series) -> None:
        self._bound_store = st
        self._word = series.word

    def _attach_sink(self, sink: Storage) -> None:
        self._bound_store = sink
        self._word = sink.sink_words(2)

    def state(self, state: str) -> None:
        """Set the current state."""
        if self._labelnames and not self._labelvalues:
            raise self._unbound_error()
        index = self._states.index(state)
        self._bound_store.set_lane(self._word, index)


# ---------------------------------------------------------------------------
# Exemplars
# ---------------------------------------------------------------------------

def _write_exemplar(metric: _Family, bucket: int, exemplar: dict, value: float) -> None:
    st = metric._store
    if st.sink or metric._series is None:    # the series itself was not stored
        return
    data = json.dumps(exemplar, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > _core.METRIC_EXEMPLAR_LABELS:
        return   # longer than a cell holds: documented, the observation itself counted
    try:
        cell = st.exemplar_cell(metric._series, bucket)
    except Dropped:
        st.count_dropped()
        return
    st.map.write_exemplar(cell, data, value, time.time())


def _read_exemplar(st: Storage, series: _storage.Series, bucket: int) -> Exemplar | None:
    cell = series.exemplars.get(bucket)
    if cell is None:
        return None
    found = st.map.read_exemplar(cell)
    if found is None:
        return None
    data, value, timestamp = found
    try:
        labels = json.loads(data)
    except ValueError:
        return None
    if not isinstance(labels, dict):
        return None
    return Exemplar({str(k): str(v) for k, v in labels.items()}, value, timestamp)


# ---------------------------------------------------------------------------
# Collection from storage
# ---------------------------------------------------------------------------

class _Liveness:
    """Process entries and whether each process still runs, read once per
    collection."""

    def __init__(self, st: Storage):
        self.entries: dict[int, tuple[int, int, bool]] = {}
        if st.shared:
            for entry, pid, started, gen in st.processes():
                if pid:
                    self.entries[entry] = (pid, gen, _procid.alive(pid, started))
        else:
            self.entries[0] = (os.getpid(), 1, True)


def _gauge_values(st: Storage, series: _storage.Series, live: _Liveness,
                  only_live: bool) -> list[tuple[int, float, float]]:
    out = []
    for entry, cell in series.cells.items():
        owner = live.entries.get(entry)
        if owner is None:
            continue
        pid, gen, alive = owner
        value, timestamp, cell_gen = st.map.read_cell(cell)
        if cell_gen != gen or (only_live and not alive):
            continue
        out.append((pid, value, timestamp))
    return out


class StoredMetric:
    """A counter, histogram or summary family read from storage, in
    prometheus_client's ``Metric`` shape.  The exposition renders it
    straight from the values read in bulk, with each series' label text
    cached, which is what keeps a scrape of thousands of series in
    milliseconds; ``samples`` are built only when something asks for them
    (get_sample_value, a name filter, prometheus_client)."""

    def __init__(self, st: Storage, family: _storage.Family, name: str, rows: list):
        self.name = name
        self.documentation = family.help
        self.type = family.type
        self.unit = family.unit
        self._st = st
        self._family = family
        self._rows = rows
        self._samples: list[Sample] | None = None

    @property
    def samples(self) -> list[Sample]:
        if self._samples is None:
            self._samples = self._build_samples()
        return self._samples

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        self._samples = value

    def add_sample(self, name: str, labels: dict[str, str], value: float,
                   timestamp: float | None = None, exemplar: Exemplar | None = None) -> None:
        self.samples.append(Sample(name, labels, value, timestamp, exemplar))

    def _build_samples(self) -> list[Sample]:
        out: list[Sample] = []
        name, st, family = self.name, self._st, self._family
        for series, values in self._rows:
            labels = dict(zip(family.labelnames, series.values))
            if self.type == "counter":
                out.append(Sample(name + "_total", labels, values,
                                  None, _read_exemplar(st, series, 0)))
            elif self.type == "histogram":
                for bucket, bound in enumerate(family.buckets):
                    out.append(Sample(name + "_bucket", {**labels, "le": _le(bound)},
                                      values[bucket], None,
                                      _read_exemplar(st, series, bucket)))
                out.append(Sample(name + "_count", labels, values[-2]))
                out.append(Sample(name + "_sum", labels, values[-1]))
            else:
                out.append(Sample(name + "_count", labels, values[0]))
                out.append(Sample(name + "_sum", labels, values[1]))
            out.append(Sample(name + "_created", labels, series.created))
        return out

    def _render(self, openmetrics: bool) -> tuple[list[str], dict[str, list[str]]]:
        """(sample lines, text format's extra families by suffix)."""
        from ._exposition import exemplar_text, format_float
        name, st, family = self.name, self._st, self._family
        lines: list[str] = []
        created: list[str] = []
        omit_sum = False
        if openmetrics and self.type == "histogram":
            omit_sum = family.buckets[0] < 0 or any(v[-1] < 0 for _, v in self._rows)
        for series, values in self._rows:
            text = series.text
            if text is None:
                text = series.text = _label_text(dict(zip(family.labelnames, series.values)))
                series.created_text = format_float(series.created)
            if self.type == "counter":
                line = f"{name}_total{text} {format_float(values)}"
                if openmetrics and series.exemplars:
                    line += exemplar_text(_read_exemplar(st, series, 0))
                lines.append(line + "\n")
            elif self.type == "histogram":
                bucket_texts = series.bucket_texts
                if bucket_texts is None:
                    labels = dict(zip(family.labelnames, series.values))
                    bucket_texts = series.bucket_texts = [
                        _label_text({**labels, "le": _le(b)}) for b in family.buckets]
                for bucket, bucket_text in enumerate(bucket_texts):
                    line = f"{name}_bucket{bucket_text} {format_float(values[bucket])}"
                    if openmetrics and series.exemplars:
                        line += exemplar_text(_read_exemplar(st, series, bucket))
                    lines.append(line + "\n")
                if not omit_sum:
                    lines.append(f"{name}_count{text} {format_float(values[-2])}\n")
                    lines.append(f"{name}_sum{text} {format_float(values[-1])}\n")
            else:
                lines.append(f"{name}_count{text} {format_float(values[0])}\n")
                lines.append(f"{name}_sum{text} {format_float(values[1])}\n")
            (lines if openmetrics else created).append(
                f"{name}_created{text} {series.created_text}\n")
        return lines, ({"_created": created} if created else {})


def _label_text(labels: dict[str, str]) -> str:
    from ._exposition import label_text
    return label_text(labels)


def collect_family(st: Storage, family: _storage.Family, live: _Liveness,
                   name: str | None = None) -> Metric | StoredMetric:
    """One family, every live series, from storage."""
    name = name or family.name
    if family.type in ("counter", "histogram", "summary"):
        stored = list(family.series.values())
        words = [s.word for s in stored]
        read: list[Any]
        if family.type == "counter":
            read = st.map.read_counters(words)
        else:
            nb = len(family.buckets or ()) if family.type == "histogram" else 1
            read = st.map.read_observations(words, nb)
        rows = [(s, v) for s, v in zip(stored, read) if v is not None]
        return StoredMetric(st, family, name, rows)
    metric = Metric(name, family.help, family.type, family.unit)
    labelnames = family.labelnames
    for values, series in list(family.series.items()):
        if st.removed(series):
            continue
        labels = dict(zip(labelnames, values))
        kind = family.type
        if kind == "gauge":
            mode = family.mode or "all"
            cells = _gauge_values(st, series, live, mode.startswith("live"))
            if not st.shared:
                for _pid, value, _ts in cells:
                    metric.add_sample(name, labels, value)
                continue
            if not cells:
                continue
            base = mode[4:] if mode.startswith("live") else mode
            if base == "all":
                for pid, value, _ts in sorted(cells):
                    metric.add_sample(name, {**labels, "pid": str(pid)}, value)
            elif base == "min":
                metric.add_sample(name, labels, min(v for _, v, _ in cells))
            elif base == "max":
                metric.add_sample(name, labels, max(v for _, v, _ in cells))
            elif base == "sum":
                metric.add_sample(name, labels, math.fsum(v for _, v, _ in cells))
            else:   # mostrecent
                metric.add_sample(name, labels, max(cells, key=lambda c: c[2])[1])
        elif kind == "info":
            labels = dict(zip(labelnames, values[:-1]))
            labels.update(json.loads(values[-1]))
            metric.add_sample(name + "_info", labels, 1.0)
        elif kind == "stateset":
            current = st.lane(series.word)
            for index, state in enumerate(family.states or ()):
                metric.add_sample(name, {**labels, name: state},
                                  1.0 if index == current else 0.0)
    return metric


def _le(bound: float) -> str:
    from ._exposition import format_float
    return format_float(bound)


def collect_storage(st: Storage, skip: set[str] | frozenset[str] = frozenset()
                    ) -> Iterator[Metric | StoredMetric]:
    """Every family in a storage (the exporter's view), then the count of
    series that could not be stored."""
    st.refresh()
    live = _Liveness(st)
    for family in list(st.families_by_id.values()):
        if family.name not in skip:
            yield collect_family(st, family, live)
    if not st.shared and not st.dropped():
        return
    dropped = Metric(DROPPED_NAME, "Series, gauge cells and exemplars that could not be "
                     "stored (metrics file full, or its creation lock unavailable): their "
                     "updates are not exported", "counter")
    dropped.add_sample(DROPPED_NAME + "_total", {}, float(st.dropped()))
    yield dropped


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

class CollectorRegistry:
    """Collectors (our metrics, custom collectors, prometheus_client
    collectors) to expose together; prometheus_client's CollectorRegistry
    interface.  The default ``REGISTRY`` also exposes every family of the
    shared metrics file that no collector here yielded (families declared
    by other processes), and ``rseq_metrics_dropped_series_total``."""

    def __init__(self, auto_describe: bool = False, target_info: dict | None = None,
                 *, _storage_sweep: bool = False):
        self._lock = threading.Lock()
        self._collectors: dict[Any, list[str]] = {}
        self._names: dict[str, Any] = {}
        self._auto_describe = auto_describe
        self._sweep = _storage_sweep
        self._target_info = target_info

    def register(self, collector: Any) -> None:
        with self._lock:
            names = self._get_names(collector)
            duplicates = set(self._names) & set(names)
            if duplicates:
                raise ValueError(f"Duplicated timeseries in CollectorRegistry: "
                                 f"{sorted(duplicates)}")
            for name in names:
                self._names[name] = collector
            self._collectors[collector] = names

    def unregister(self, collector: Any) -> None:
        with self._lock:
            for name in self._collectors.pop(collector, []):
                self._names.pop(name, None)

    def _get_names(self, collector: Any) -> list[str]:
        if isinstance(collector, _Family):
            return collector._names()
        describe = getattr(collector, "describe", None)
        if describe is None and self._auto_describe:
            describe = collector.collect
        if describe is None:
            return []
        names = []
        for metric in describe():
            names.append(metric.name)
            suffixes = {"counter": ("_total", "_created"), "summary": ("_sum", "_count",
                        "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                        "info": ("_info",)}.get(metric.type, ())
            names.extend(metric.name + s for s in suffixes)
        return names

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            collectors = list(self._collectors)
        seen: set[str] = set()
        for collector in collectors:
            if isinstance(collector, Gauge):
                for child in [collector, *(collector._children or {}).values()]:
                    child._refresh_function()
            for metric in collector.collect():
                seen.add(metric.name)
                yield metric
        if self._sweep:
            st = storage()
            if st.shared:
                yield from collect_storage(st, skip=seen)
            elif st.dropped():
                yield from collect_storage(st, skip=set(st.families))

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None
                         ) -> float | None:
        """The value of one sample, or None (for tests, as prometheus_client)."""
        labels = labels or {}
        for metric in self.collect():
            for s in metric.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return None

    def restricted_registry(self, names: Iterable[str]) -> _Restricted:
        return _Restricted(self, set(names))


class _Restricted:
    def __init__(self, registry: CollectorRegistry, names: set[str]):
        self._registry = registry
        self._wanted = names

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            samples = [s for s in metric.samples if s.name in self._wanted]
            if samples or metric.name in self._wanted:
                restricted = Metric(metric.name, metric.documentation, metric.type,
                                    metric.unit)
                restricted.samples = samples
                yield restricted


REGISTRY = CollectorRegistry(auto_describe=True, _storage_sweep=True)


def _default_registry(registry: Any) -> Any:
    return REGISTRY if registry is ... else registry


class StorageCollector:
    """Every family of a metrics file, as an exporter that never imported
    the application sees them: ``StorageCollector(Storage.open(name,
    readonly=True))``."""

    def __init__(self, st: Storage):
        self._storage = st

    def collect(self) -> Iterator[Metric]:
        yield from collect_storage(self._storage)


class PrometheusClientCollector:
    """Serve a prometheus_client registry (default: its global REGISTRY,
    with its process and GC collectors) beside our metrics::

        REGISTRY.register(PrometheusClientCollector())
    """

    def __init__(self, registry: Any = None):
        if registry is None:
            import prometheus_client
            registry = prometheus_client.REGISTRY
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        yield from self._registry.collect()


def generate_latest(registry: Any = REGISTRY) -> bytes:
    """The registry in Prometheus text format 0.0.4."""
    from ._exposition import generate_text
    return generate_text(registry.collect())

