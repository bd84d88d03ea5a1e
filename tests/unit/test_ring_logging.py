"""rseq.logging: RingHandler in several processes -> RingListener -> an
ordinary file handler, with exception info and extra fields."""
from __future__ import annotations

import logging
import multiprocessing
import os

import pytest

import rseq
import rseq.logging as rlog


def _worker(name, worker, n):
    logger = logging.getLogger(f"worker.{worker}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(rlog.RingHandler(name))
    for i in range(n):
        if i % 50 == 0:
            try:
                raise KeyError(f"boom {worker} {i}")
            except KeyError:
                logger.exception("failed %d/%d", worker, i, extra={"job": f"j{worker}-{i}"})
        else:
            logger.info("record %d/%d", worker, i, extra={"job": f"j{worker}-{i}"})


def test_records_from_several_processes_reach_one_file(tmp_path):
    name = str(tmp_path / "ring")
    out = tmp_path / "app.log"
    ring = rseq.Ring.create(name, size_per_cpu=1 << 20)
    file_handler = logging.FileHandler(out)
    file_handler.setFormatter(logging.Formatter("%(process)d %(name)s %(job)s %(message)s"))
    with rlog.RingListener(ring, file_handler):
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_worker, args=(name, w, 200)) for w in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            assert p.exitcode == 0
    file_handler.close()
    lines = out.read_text().splitlines()
    records = [line for line in lines if line.split(" ")[1].startswith("worker.")]
    assert len(records) == 4 * 200, ring.stats()
    for w in range(4):
        for i in range(200):
            assert any(f" j{w}-{i} " in line for line in records), (w, i)
    text = out.read_text()
    assert text.count("Traceback (most recent call last)") == 4 * 4
    assert "KeyError: 'boom 3 150'" in text
    assert {line.split(" ")[0] for line in records} == {str(p.pid) for p in procs}
    stats = ring.stats()
    assert stats.dropped == 0 and stats.consumed == stats.committed == 800
    ring.close()


def test_handler_counts_drops_and_never_truncates_silently(tmp_path):
    name = str(tmp_path / "ring")
    with rseq.Ring.create(name, size_per_cpu=4096, max_record=600) as ring:
        logger = logging.getLogger("rseq.test.small")
        logger.propagate = False
        handler = rlog.RingHandler(ring)
        logger.addHandler(handler)
        logger.warning("x" * 5000)
        got = rlog.RingListener(ring).dequeue(False)
        assert len(got) == 1 and "truncated by rseq.logging.RingHandler: 5000 bytes" \
            in got[0].getMessage()
        os.sched_setaffinity(0, {0}) if hasattr(os, "sched_setaffinity") else None
        for _ in range(200):
            logger.warning("fill")
        assert handler.dropped > 0
        assert ring.stats().dropped == handler.dropped
        logger.removeHandler(handler)
        os.sched_setaffinity(0, set(range(os.cpu_count())))


def test_listener_shape_matches_queue_listener(tmp_path):
    from logging.handlers import QueueListener
    for method in ("start", "stop", "dequeue", "prepare", "handle"):
        assert callable(getattr(rlog.RingListener, method))
        assert callable(getattr(QueueListener, method))
    assert issubclass(rlog.RingHandler, logging.Handler)
    with rseq.Ring.create(str(tmp_path / "r")) as ring:
        listener = rlog.RingListener(ring, logging.NullHandler(), respect_handler_level=True)
        listener.start()
        with pytest.raises(RuntimeError):
            listener.start()
        listener.stop()
        listener.stop()


def test_undecodable_records_are_reported_not_fatal(tmp_path):
    with rseq.Ring.create(str(tmp_path / "r")) as ring:
        ring.put(b"not a pickle")
        records = rlog.RingListener(ring).dequeue(False)
        assert records[0].levelno == logging.ERROR
        assert "undecodable record" in records[0].getMessage()


def test_module_does_not_shadow_the_standard_library():
    import logging as std
    assert std.__name__ == "logging" and hasattr(std, "getLogger")
    assert rlog.logging is std


def test_unpicklable_extra_fields_travel_as_repr(tmp_path):
    import threading
    with rseq.Ring.create(str(tmp_path / "r")) as ring:
        logger = logging.getLogger("rseq.test.unpicklable")
        logger.propagate = False
        handler = rlog.RingHandler(ring)
        logger.addHandler(handler)
        logger.warning("with a lock", extra={"lock": threading.Lock(), "n": 5})
        logger.removeHandler(handler)
        (record,) = rlog.RingListener(ring).dequeue(False)
        assert record.getMessage() == "with a lock" and record.n == 5
        assert "lock" in record.lock and isinstance(record.lock, str)
