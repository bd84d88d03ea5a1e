"""Logging through an ``rseq.Ring``: ``RingHandler`` and ``RingListener``.

The same shape as the standard library's ``QueueHandler`` /
``QueueListener``: every process (or thread) logs through a
``RingHandler``, which puts each record into a shared-memory ring without a
lock, a pipe or a feeder thread; one ``RingListener`` takes the records and
hands them to ordinary handlers (a file, a stream, syslog...).  So a program
with many worker processes logs through one file handler, a worker killed
at any instant leaves nothing half-written, and a record that could not be
delivered (its CPU's lane was full: the "drop" policy) is counted in
``ring.stats().dropped``, never silently lost.

    # the main process
    ring = rseq.Ring.create("myapp-log")
    listener = rseq.logging.RingListener(ring, logging.FileHandler("app.log"))
    listener.start()
    # every worker process
    logging.getLogger().addHandler(rseq.logging.RingHandler("myapp-log"))

Records travel as pickled dictionaries, prepared as ``QueueHandler``
prepares them (message formatted, arguments merged, exception text
rendered, unpicklable attributes replaced by their ``repr``).  A record
larger than the ring's ``max_record`` has its message shortened to fit,
with a note saying so.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import threading

from ._ring import Ring

__all__ = ["RingHandler", "RingListener"]

_TRUNCATED = " [truncated by rseq.logging.RingHandler: {} bytes]"


def _as_ring(ring: Ring | str | os.PathLike) -> Ring:
    return ring if isinstance(ring, Ring) else Ring.open(ring)


class RingHandler(logging.Handler):
    """A handler that puts every record into an ``rseq.Ring``.

    ``ring``: an open ``Ring``, or the name of one (opened here, in this
    process).  ``dropped`` counts the records this handler could not put
    because their lane was full (the ring counts them too, across every
    process).
    """

    def __init__(self, ring: Ring | str | os.PathLike):
        super().__init__()
        self.ring = _as_ring(ring)
        self.dropped = 0
        self._pid = os.getpid()

    def prepare(self, record: logging.LogRecord) -> dict:
        """The record as a dictionary (QueueHandler.prepare's rules: the
        message is formatted once, here); encode() makes it picklable."""
        msg = self.format(record)
        record = copy.copy(record)
        record.message = msg
        record.msg = msg
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return dict(record.__dict__)

    def encode(self, data: dict) -> bytes:
        try:
            payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            # An attribute that cannot be pickled (an extra field holding a
            # lock, a socket...) travels as its repr.
            for key, value in data.items():
                try:
                    pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:
                    data[key] = repr(value)
            payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        limit = self.ring.max_record
        if len(payload) <= limit:
            return payload
        # Shorten the message (never drop the record): keep what fits.
        msg = data["msg"]
        excess = len(payload) - limit
        note = _TRUNCATED.format(len(msg.encode()))
        keep = max(0, len(msg) - excess - len(note) - 16)
        while True:
            data = dict(data, msg=msg[:keep] + note, message=msg[:keep] + note)
            payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
            if len(payload) <= limit or keep == 0:
                break
            keep = max(0, keep - (len(payload) - limit) - 16)
        if len(payload) > limit:
            # Even an empty message does not fit: the bare essentials.
            data = {k: data[k] for k in ("name", "levelno", "levelname", "msg", "message",
                                         "created", "process") if k in data}
            payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        return payload

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not self.ring.put(self.encode(self.prepare(record))):
                self.dropped += 1
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        super().close()


class RingListener:
    """Takes records from an ``rseq.Ring`` in a thread and hands each to
    ``handlers`` (the shape of ``logging.handlers.QueueListener``).

    ``ring``: an open ``Ring`` or the name of one; this listener becomes its
    consumer (one at a time: ``rseq.RingBusyError`` otherwise).
    ``respect_handler_level``: as in QueueListener.  ``start()`` starts the
    thread, ``stop()`` delivers everything already in the ring, then stops.
    """

    _poll = 0.1  # seconds between checks of stop(); records wake it at once

    def __init__(self, ring: Ring | str | os.PathLike, *handlers: logging.Handler,
                 respect_handler_level: bool = False):
        self.ring = _as_ring(ring)
        self.handlers = handlers
        self.respect_handler_level = respect_handler_level
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def dequeue(self, block: bool) -> list[logging.LogRecord]:
        """The next batch of records (waiting up to a poll interval if
        ``block``)."""
        batch = self.ring.consume(1024, self._poll if block else 0)
        return [self.prepare(data) for data in batch]

    def prepare(self, data: bytes) -> logging.LogRecord:
        try:
            fields = pickle.loads(data)
            if not isinstance(fields, dict):
                raise TypeError(f"not a log record: {type(fields).__name__}")
        except Exception as e:
            fields = {"name": "rseq.logging", "levelno": logging.ERROR,
                      "levelname": "ERROR",
                      "msg": f"undecodable record in the ring ({e}): {data[:80]!r}"}
        return logging.makeLogRecord(fields)

    def handle(self, record: logging.LogRecord) -> None:
        for handler in self.handlers:
            if not self.respect_handler_level or record.levelno >= handler.level:
                handler.handle(record)

    def _monitor(self) -> None:
        while not self._stop.is_set():
            for record in self.dequeue(True):
                self.handle(record)
        while True:  # deliver what is already there
            records = self.dequeue(False)
            if not records:
                break
            for record in records:
                self.handle(record)
        self.ring.ack()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("RingListener already started")
        # Become the consumer now, in the caller: a busy ring fails here.
        if self.ring._consumer is None:
            self.ring._become_consumer()
        self._stop.clear()
        self._thread = threading.Thread(target=self._monitor, name="rseq.RingListener",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> RingListener:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
