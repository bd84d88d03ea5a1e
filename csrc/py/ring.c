/*
 * ring.c - the binding of the shared-memory ring (csrc/lib/ring.h):
 * rseq._core._RingMap and rseq.RingRecord.
 *
 * The file, its header, its validation and the consumer lease's policy are
 * handled in Python (src/rseq/_ring.py); this file gets a buffer over the
 * mapping and the layout the header declared, checks the layout against
 * the buffer once more, and implements what needs the critical section or
 * atomics: put, consume (with the futex wait), acknowledge, statistics and
 * the lease word.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <structseq.h>

#include <math.h>
#include <pthread.h>
#include <stdlib.h>

#include "core.h"
#include "counter_type.h"
#include "ring.h"
#include "ring_type.h"
#include "thread_area.h"

/* getpid() is a system call since glibc 2.25: cache it, refreshed in a
 * forked child. */
static uint32_t ring_pid;
static pthread_once_t ring_pid_once = PTHREAD_ONCE_INIT;

static void ring_pid_reset(void) { ring_pid = (uint32_t)getpid(); }
static void ring_pid_init(void)
{
    ring_pid_reset();
    pthread_atfork(NULL, NULL, ring_pid_reset);
}

static PyTypeObject *RingRecord_type;
static PyTypeObject *RingMap_type;   /* borrowed: the module keeps it */

static PyStructSequence_Field record_fields[] = {
    {"data", "the payload (bytes)"},
    {"cpu", "the lane the record was put on: the producer's CPU, or -1 for the "
            "fallback lane of threads without rseq"},
    {"seq", "its sequence number in that lane (from 0; consecutive within a lane)"},
    {"time_ns", "CLOCK_MONOTONIC at the put, in ns (0 if the ring records no time)"},
    {"pid", "the producer's process id"},
    {NULL, NULL},
};

static PyStructSequence_Desc record_desc = {
    RSEQ_TYPE_NAME("RingRecord"),
    "A record taken from an rseq.Ring: (data, cpu, seq, time_ns, pid).",
    record_fields,
    5,
};

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    int readonly;
    uint64_t length;
    struct ring ring;
    uint32_t nlanes;
    struct ring_cursor *taken;   /* consumer: position after what it has taken */
    struct ring_cursor *acked;   /* consumer: what the file says */
    int consumer;
} RingMapObject;

static PyObject *ring_format_error(RingMapObject *m, const char *fmt, ...)
{
    rseq_module_state *st = PyType_GetModuleState(Py_TYPE(m));
    va_list ap;
    va_start(ap, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg) {
        PyErr_SetObject(st->ArenaFormatError, msg);
        Py_DECREF(msg);
    }
    return NULL;
}

static PyObject *ring_map_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "control_offset", "lanes_offset", "lane_stride",
                             "ncpu", "size", "max_record", "overwrite", "timestamps",
                             "readonly", NULL};
    PyObject *buffer;
    unsigned long long control_offset, lanes_offset, lane_stride;
    unsigned int ncpu, size, max_record;
    int overwrite, timestamps, readonly = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKKKIIIpp|p:_RingMap", kwlist, &buffer,
                                     &control_offset, &lanes_offset, &lane_stride, &ncpu,
                                     &size, &max_record, &overwrite, &timestamps, &readonly))
        return NULL;
    RingMapObject *m = (RingMapObject *)type->tp_alloc(type, 0);
    if (!m)
        return NULL;
    if (PyObject_GetBuffer(buffer, &m->view,
                           readonly ? PyBUF_SIMPLE : (PyBUF_WRITABLE | PyBUF_SIMPLE)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    m->have_view = 1;
    m->readonly = readonly;
    m->length = (uint64_t)m->view.len;
    char *base = m->view.buf;
    uint32_t slack = ring_record_size(max_record);
    uint64_t lanes_bytes, end;
    /* No offset is trusted before it is checked against the mapping. */
    if (ncpu == 0 || ncpu > 65536 || size < 4096 || size > RING_MAX_SIZE
        || (size & (size - 1)) || max_record == 0 || max_record > size / 4
        || slack * 2 > size) {
        ring_format_error(m, "ring layout: %u CPUs, %u bytes per lane, records up to %u "
                          "bytes is not a valid layout", ncpu, size, max_record);
        Py_DECREF(m);
        return NULL;
    }
    if (control_offset % 4096 || lanes_offset % 4096 || lane_stride % 4096
        || control_offset + RING_CONTROL_SIZE > lanes_offset
        || lane_stride < (uint64_t)RING_LANE_CONTROL + size + slack
        || __builtin_mul_overflow((uint64_t)ncpu + 1, lane_stride, &lanes_bytes)
        || __builtin_add_overflow(lanes_offset, lanes_bytes, &end) || end > m->length
        || ((uintptr_t)base) % 4096) {
        ring_format_error(m, "ring layout does not fit its mapping of %llu bytes",
                          (unsigned long long)m->length);
        Py_DECREF(m);
        return NULL;
    }
    m->ring.control = base + control_offset;
    m->ring.lanes = base + lanes_offset;
    m->ring.lane_stride = lane_stride;
    m->ring.ncpu = ncpu;
    m->ring.size = size;
    m->ring.slack = slack;
    m->ring.max_record = max_record;
    m->ring.overwrite = overwrite;
    m->ring.timestamps = timestamps;
    m->nlanes = ncpu + 1;
    pthread_once(&ring_pid_once, ring_pid_init);
    return (PyObject *)m;
}

static void ring_map_dealloc(RingMapObject *m)
{
    PyTypeObject *type = Py_TYPE(m);
    PyMem_Free(m->taken);
    PyMem_Free(m->acked);
    if (m->have_view)
        PyBuffer_Release(&m->view);
    type->tp_free((PyObject *)m);
    Py_DECREF(type);
}

/* ------------------------------------------------------------------------
 * Producer
 * ------------------------------------------------------------------------ */

static PyObject *ring_map_put(RingMapObject *m, PyObject *arg)
{
    const char *data;
    Py_ssize_t length;
    Py_buffer view;
    int have_view = 0;
    if (PyBytes_CheckExact(arg)) {
        data = PyBytes_AS_STRING(arg);
        length = PyBytes_GET_SIZE(arg);
    } else {
        if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Format(PyExc_TypeError, "Ring.put() takes a bytes-like object, not %.100s",
                         Py_TYPE(arg)->tp_name);
            return NULL;
        }
        have_view = 1;
        data = view.buf;
        length = view.len;
    }
    if ((size_t)length > m->ring.max_record || m->readonly) {
        if (have_view)
            PyBuffer_Release(&view);
        if (m->readonly)
            PyErr_SetString(PyExc_PermissionError,
                            "this ring was opened read-only: put() needs Ring.open(name)");
        else
            PyErr_Format(PyExc_ValueError, "record of %zd bytes: this ring takes at most %u",
                         length, m->ring.max_record);
        return NULL;
    }
    uint32_t need = ring_record_size((uint32_t)length);
    char stack[2048] __attribute__((aligned(16)));
    char *record = stack;
    if (need > sizeof stack) {
        record = PyMem_Malloc(need);
        if (!record) {
            if (have_view)
                PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
    }
    memcpy(record + RING_RECORD_HEADER, data, (size_t)length);
    /* Padding: never publish stale private bytes. */
    memset(record + RING_RECORD_HEADER + length, 0, need - RING_RECORD_HEADER - length);
    if (have_view)
        PyBuffer_Release(&view);
    struct rseq_abi *rs = counter_thread_area();
    int ret = ring_put_record(&m->ring, rs, record, (uint32_t)length, ring_pid);
    if (record != stack)
        PyMem_Free(record);
    if (__builtin_expect(rs != NULL && rseq_area_lost(rs), 0))
        counter_thread_area_recheck(); /* recorded in info().fallback */
    if (ret == RING_PUT_COMMITTED)
        Py_RETURN_TRUE;
    if (ret == RING_PUT_DROPPED)
        Py_RETURN_FALSE;
    return ring_format_error(m, "ring is corrupt: a record length in the overwritten "
                             "region is out of range");
}

/* ------------------------------------------------------------------------
 * Consumer
 * ------------------------------------------------------------------------ */

static int need_consumer(RingMapObject *m)
{
    if (m->consumer)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "this ring handle is not attached as the consumer");
    return -1;
}

static PyObject *ring_map_attach(RingMapObject *m, PyObject *Py_UNUSED(unused))
{
    if (m->readonly) {
        PyErr_SetString(PyExc_PermissionError, "a read-only ring cannot be consumed");
        return NULL;
    }
    if (!m->taken) {
        m->taken = PyMem_Calloc(m->nlanes, sizeof *m->taken);
        m->acked = PyMem_Calloc(m->nlanes, sizeof *m->acked);
        if (!m->taken || !m->acked)
            return PyErr_NoMemory();
    }
    for (uint32_t i = 0; i < m->nlanes; i++) {
        struct ring_lane *lane = ring_lane(&m->ring, i);
        m->acked[i] = ring_read_cursor(lane);
        m->taken[i] = m->acked[i];
        /* A predecessor may have died between its version flip and its
         * tail store: publish the tail the cursor says. */
        __atomic_store_n(&lane->tail, m->acked[i].pos, __ATOMIC_RELEASE);
    }
    m->consumer = 1;
    Py_RETURN_NONE;
}

static PyObject *ring_map_detach(RingMapObject *m, PyObject *Py_UNUSED(unused))
{
    m->consumer = 0;
    Py_RETURN_NONE;
}

/* Publish what has been taken: every record handed out so far is
 * acknowledged. */
static void ack_all(RingMapObject *m)
{
    for (uint32_t i = 0; i < m->nlanes; i++) {
        if (memcmp(&m->taken[i], &m->acked[i], sizeof m->taken[i]) == 0)
            continue;
        ring_write_cursor(ring_lane(&m->ring, i), &m->taken[i]);
        m->acked[i] = m->taken[i];
    }
}

static PyObject *ring_map_ack(RingMapObject *m, PyObject *Py_UNUSED(unused))
{
    if (need_consumer(m) < 0)
        return NULL;
    ack_all(m);
    Py_RETURN_NONE;
}

static PyObject *ring_map_pending(RingMapObject *m, PyObject *Py_UNUSED(unused))
{
    if (need_consumer(m) < 0)
        return NULL;
    uint64_t n = 0;
    for (uint32_t i = 0; i < m->nlanes; i++)
        n += m->taken[i].passed - m->acked[i].passed;
    return PyLong_FromUnsignedLongLong(n);
}

struct taken_record {
    PyObject *obj;
    uint64_t time_ns;
    struct ring_cursor after;
};

struct lane_batch {
    struct taken_record *items;
    Py_ssize_t count, used;
    struct ring_cursor before;  /* the cursor after any skip, before items[0] */
};

static PyObject *make_record(RingMapObject *m, const struct ring_record *rec,
                             const char *payload, uint32_t lane, uint64_t seq, int full)
{
    PyObject *data = PyBytes_FromStringAndSize(payload, rec->length);
    if (!data || !full)
        return data;
    PyObject *r = PyStructSequence_New(RingRecord_type);
    if (!r) {
        Py_DECREF(data);
        return NULL;
    }
    PyStructSequence_SET_ITEM(r, 0, data);
    PyStructSequence_SET_ITEM(r, 1, PyLong_FromLong(lane < m->ring.ncpu ? (long)lane : -1));
    PyStructSequence_SET_ITEM(r, 2, PyLong_FromUnsignedLongLong(seq));
    PyStructSequence_SET_ITEM(r, 3, PyLong_FromUnsignedLongLong(rec->time_ns));
    PyStructSequence_SET_ITEM(r, 4, PyLong_FromUnsignedLong(rec->pid));
    for (int i = 1; i < 5; i++) {
        if (!PyStructSequence_GET_ITEM(r, i)) {
            Py_DECREF(r);
            return NULL;
        }
    }
    return r;
}

/* Take up to `max` records of lane i into b (not yet handed out). */
static int gather_lane(RingMapObject *m, uint32_t i, Py_ssize_t max, int full,
                       struct lane_batch *b)
{
    struct ring_lane *lane = ring_lane(&m->ring, i);
    struct ring_cursor cur = m->taken[i];
    uint64_t head = __atomic_load_n(&lane->head, __ATOMIC_ACQUIRE);
    int torn = 0;
    b->count = b->used = 0;
    b->before = cur;
    while (b->count < max) {
        if (m->ring.overwrite) {
            uint64_t oseq;
            uint32_t opos;
            ring_read_oldest(lane, &oseq, &opos);
            if (ring_after(opos, (uint32_t)cur.pos)) {
                /* Overwritten before we got there: skip, counted by seq.
                 * oldest may now lie past the head read above (producers
                 * went on since): read head again, or the next record would
                 * look as if it ran past the head. */
                cur.passed = oseq;
                cur.pos = opos;
                head = __atomic_load_n(&lane->head, __ATOMIC_ACQUIRE);
                if (b->count == 0)
                    b->before = cur;
                else
                    b->items[b->count - 1].after = cur;
            }
        }
        struct ring_record rec;
        const char *payload;
        int ret = ring_peek(&m->ring, lane, (uint32_t)cur.pos, (uint32_t)cur.passed, head,
                            &rec, &payload);
        if (ret == 0)
            break;
        if (ret < 0) {
            if (m->ring.overwrite && ++torn < 1000) {
                /* overwritten under us: oldest has moved on (and head too) */
                head = __atomic_load_n(&lane->head, __ATOMIC_ACQUIRE);
                continue;
            }
            ring_format_error(m, "ring lane %u is corrupt at position %u (record of %u "
                              "bytes, sequence %u, expected %u)", i, (uint32_t)cur.pos,
                              rec.length, rec.seq, (uint32_t)cur.passed);
            return -1;
        }
        PyObject *obj = make_record(m, &rec, payload, i, cur.passed, full);
        if (!obj)
            return -1;
        if (m->ring.overwrite) {
            uint64_t oseq;
            uint32_t opos;
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            ring_read_oldest(lane, &oseq, &opos);
            if (ring_after(opos, (uint32_t)cur.pos)) {
                Py_DECREF(obj); /* possibly torn: skipped on the next turn */
                continue;
            }
        }
        if (b->count == 0 || b->count == b->used) {
            Py_ssize_t cap = b->count ? b->count * 2 : 16;
            if (cap > max)
                cap = max;
            if (cap < b->count + 1)
                cap = b->count + 1;
            struct taken_record *items = PyMem_Realloc(b->items, cap * sizeof *items);
            if (!items) {
                Py_DECREF(obj);
                PyErr_NoMemory();
                return -1;
            }
            b->items = items;
            b->used = cap;
        }
        cur.pos = (uint32_t)(cur.pos + ring_record_size(rec.length));
        cur.passed++;
        cur.consumed++;
        b->items[b->count].obj = obj;
        b->items[b->count].time_ns = rec.time_ns;
        b->items[b->count].after = cur;
        b->count++;
    }
    if (b->count == 0)
        b->before = cur;
    return 0;
}

static int lanes_have_data(RingMapObject *m)
{
    for (uint32_t i = 0; i < m->nlanes; i++) {
        struct ring_lane *lane = ring_lane(&m->ring, i);
        uint64_t head = __atomic_load_n(&lane->head, __ATOMIC_ACQUIRE);
        if (ring_head_pos(head) != (uint32_t)m->taken[i].pos)
            return 1;
    }
    return 0;
}

/* Collect up to max records from every lane, merged by time (per-lane order
 * always).  Returns a new list. */
static PyObject *gather(RingMapObject *m, Py_ssize_t max, int full)
{
    struct lane_batch *batches = PyMem_Calloc(m->nlanes, sizeof *batches);
    PyObject *list = NULL;
    if (!batches)
        return PyErr_NoMemory();
    Py_ssize_t total = 0;
    for (uint32_t i = 0; i < m->nlanes; i++) {
        if (gather_lane(m, i, max, full, &batches[i]) < 0)
            goto done;
        total += batches[i].count;
    }
    list = PyList_New(total < max ? total : max);
    if (!list)
        goto done;
    Py_ssize_t *next = PyMem_Calloc(m->nlanes, sizeof *next);
    if (!next) {
        Py_CLEAR(list);
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t k = 0; k < n; k++) {
        uint32_t best = UINT32_MAX;
        for (uint32_t i = 0; i < m->nlanes; i++) {
            if (next[i] >= batches[i].count)
                continue;
            if (best == UINT32_MAX || (m->ring.timestamps && batches[i].items[next[i]].time_ns
                                       < batches[best].items[next[best]].time_ns))
                best = i;
        }
        struct taken_record *t = &batches[best].items[next[best]++];
        PyList_SET_ITEM(list, k, t->obj);
        t->obj = NULL;
    }
    /* Each lane's taken cursor moves past what was handed out (and past a
     * skip of overwritten records even if nothing was). */
    for (uint32_t i = 0; i < m->nlanes; i++)
        m->taken[i] = next[i] ? batches[i].items[next[i] - 1].after : batches[i].before;
    PyMem_Free(next);
done:
    for (uint32_t i = 0; i < m->nlanes; i++) {
        for (Py_ssize_t k = 0; k < batches[i].count; k++)
            Py_XDECREF(batches[i].items[k].obj);
        PyMem_Free(batches[i].items);
    }
    PyMem_Free(batches);
    return list;
}

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static PyObject *ring_map_consume(RingMapObject *m, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max", "timeout", "records", NULL};
    Py_ssize_t max = 1024;
    PyObject *timeout_obj = Py_None;
    int full = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nOp:consume", kwlist, &max, &timeout_obj,
                                     &full))
        return NULL;
    if (need_consumer(m) < 0)
        return NULL;
    if (max < 1) {
        PyErr_Format(PyExc_ValueError, "max must be at least 1, not %zd", max);
        return NULL;
    }
    double timeout = -1; /* forever */
    if (timeout_obj != Py_None) {
        timeout = PyFloat_AsDouble(timeout_obj);
        if (timeout == -1 && PyErr_Occurred())
            return NULL;
        if (timeout < 0 || isnan(timeout)) {
            PyErr_SetString(PyExc_ValueError, "timeout must be None or >= 0 seconds");
            return NULL;
        }
    }
    ack_all(m);
    double deadline = timeout >= 0 ? monotonic_now() + timeout : 0;
    uint32_t *waiting = ring_waiting_word(&m->ring);
    uint32_t *wake = ring_wake_word(&m->ring);
    for (;;) {
        PyObject *list = gather(m, max, full);
        if (!list || PyList_GET_SIZE(list) > 0 || timeout == 0)
            return list;
        Py_DECREF(list);
        double left = 0;
        if (timeout > 0) {
            left = deadline - monotonic_now();
            if (left <= 0)
                return PyList_New(0);
        }
        /* Sleep until a producer commits: announce, fence, look again. */
        uint32_t seen = __atomic_load_n(wake, __ATOMIC_ACQUIRE);
        __atomic_store_n(waiting, 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (lanes_have_data(m)) {
            __atomic_store_n(waiting, 0, __ATOMIC_RELAXED);
            continue;
        }
        struct timespec ts, *tsp = NULL;
        if (timeout > 0) {
            ts.tv_sec = (time_t)left;
            ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
            tsp = &ts;
        }
        long ret;
        int err;
        Py_BEGIN_ALLOW_THREADS
        ret = ring_futex(wake, FUTEX_WAIT, seen, tsp);
        err = errno;
        Py_END_ALLOW_THREADS
        if (ret < 0 && err == EINTR && PyErr_CheckSignals() < 0) {
            __atomic_store_n(waiting, 0, __ATOMIC_RELAXED);
            return NULL;
        }
        if (ret < 0 && err != EINTR && err != EAGAIN && err != ETIMEDOUT) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
}

/* ------------------------------------------------------------------------
 * Accounting
 * ------------------------------------------------------------------------ */

PyDoc_STRVAR(ring_map_stats_doc,
"stats($self, /)\n--\n\n"
"Per lane (CPUs, then the fallback lane): (produced, committed, consumed,\n"
"dropped, overwritten, in_ring).  produced = committed + dropped and\n"
"committed = consumed + overwritten + in_ring, lane by lane.");

static PyObject *ring_map_stats(RingMapObject *m, PyObject *Py_UNUSED(unused))
{
    PyObject *list = PyList_New(m->nlanes);
    if (!list)
        return NULL;
    for (uint32_t i = 0; i < m->nlanes; i++) {
        struct ring_lane *lane = ring_lane(&m->ring, i);
        struct ring_cursor c = ring_read_cursor(lane);
        uint64_t head = __atomic_load_n(&lane->head, __ATOMIC_ACQUIRE);
        uint64_t dropped = (uint64_t)__atomic_load_n(&lane->dropped, __ATOMIC_RELAXED);
        uint64_t committed, overwritten, in_ring;
        if (m->ring.overwrite) {
            uint64_t oseq;
            uint32_t opos;
            ring_read_oldest(lane, &oseq, &opos);
            /* head is within the ring of oldest: extend its 32-bit seq. */
            committed = oseq + (uint32_t)(ring_head_seq(head) - (uint32_t)oseq);
            uint64_t start = oseq > c.passed ? oseq : c.passed;
            overwritten = (c.passed - c.consumed) + (oseq > c.passed ? oseq - c.passed : 0);
            in_ring = committed - start;
        } else {
            committed = c.passed + (uint32_t)(ring_head_seq(head) - (uint32_t)c.passed);
            overwritten = c.passed - c.consumed;
            in_ring = committed - c.passed;
        }
        PyObject *t = Py_BuildValue("(KKKKKK)", (unsigned long long)(committed + dropped),
                                    (unsigned long long)committed,
                                    (unsigned long long)c.consumed,
                                    (unsigned long long)dropped,
                                    (unsigned long long)overwritten,
                                    (unsigned long long)in_ring);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

/* ------------------------------------------------------------------------
 * Lease: {pid, start time} changed only by a 16-byte CAS
 * ------------------------------------------------------------------------ */

static PyObject *ring_map_lease(RingMapObject *m, PyObject *Py_UNUSED(unused))
{
    volatile uint64_t *w = (volatile uint64_t *)(m->ring.control + RING_CONTROL_LEASE);
    for (;;) {
        uint64_t pid = w[0];
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint64_t start = w[1];
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (w[0] == pid)
            return Py_BuildValue("(KK)", (unsigned long long)pid, (unsigned long long)start);
    }
}

PyDoc_STRVAR(ring_map_lease_cas_doc,
"lease_cas($self, expect_pid, expect_start, pid, start, /)\n--\n\n"
"Replace the consumer lease (expect_pid, expect_start) with (pid, start)\n"
"atomically; True if it was replaced.");

static PyObject *ring_map_lease_cas(RingMapObject *m, PyObject *args)
{
    unsigned long long epid, estart, pid, start;
    if (!PyArg_ParseTuple(args, "KKKK:lease_cas", &epid, &estart, &pid, &start))
        return NULL;
    if (m->readonly) {
        PyErr_SetString(PyExc_PermissionError, "a read-only ring cannot be consumed");
        return NULL;
    }
    __int128 *word = (__int128 *)(m->ring.control + RING_CONTROL_LEASE);
    __int128 expect = (__int128)(((unsigned __int128)estart << 64) | epid);
    __int128 desired = (__int128)(((unsigned __int128)start << 64) | pid);
    return PyBool_FromLong(rseq_arch_cas128(word, &expect, desired));
}

int rseq_ring_put(void *handle, const void *data, size_t length);

static PyObject *ring_map_waiting(RingMapObject *m, PyObject *Py_UNUSED(unused))
{
    return PyLong_FromUnsignedLong(__atomic_load_n(ring_waiting_word(&m->ring),
                                                   __ATOMIC_RELAXED));
}

PyDoc_STRVAR(ring_map_bench_put_doc,
"_bench_put($self, iterations, length, /)\n--\n\n"
"ns of this thread's CPU time per C-level put of `length` bytes (the C API's\n"
"path; CPU time, so that time spent preempted by other work on a busy\n"
"machine is not counted), over `iterations` puts, the consumer's position moved forward by the benchmark itself so\n"
"the lane never fills (benchmarks only: do not run beside a consumer).");

static PyObject *ring_map_bench_put(RingMapObject *m, PyObject *args)
{
    unsigned long iterations;
    unsigned int length;
    if (!PyArg_ParseTuple(args, "kI:_bench_put", &iterations, &length))
        return NULL;
    if (m->readonly || length > m->ring.max_record) {
        PyErr_SetString(PyExc_ValueError, "a writable ring and length <= max_record");
        return NULL;
    }
    char payload[4096] = {0};
    uint64_t dropped = 0;
    struct timespec a, b;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (unsigned long i = 0; i < iterations; i++) {
        if (rseq_ring_put(&m->ring, payload, length > sizeof payload ? sizeof payload : length)
            != 1)
            dropped++;
        if ((i & 63) == 63) {
            /* Keep the lanes from filling: play the consumer's tail. */
            for (uint32_t l = 0; l < m->nlanes; l++) {
                struct ring_lane *lane = ring_lane(&m->ring, l);
                __atomic_store_n(&lane->tail, (uint32_t)__atomic_load_n(&lane->head,
                                 __ATOMIC_RELAXED), __ATOMIC_RELAXED);
            }
        }
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    Py_END_ALLOW_THREADS
    double ns = ((double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec))
                / (double)(iterations ? iterations : 1);
    return Py_BuildValue("(dK)", ns, (unsigned long long)dropped);
}

/* ------------------------------------------------------------------------
 * Type
 * ------------------------------------------------------------------------ */

static PyMethodDef ring_map_methods[] = {
    {"put", (PyCFunction)ring_map_put, METH_O,
     "put($self, data, /)\n--\n\n"
     "Append one record (any bytes-like object) to the lane of the CPU this\n"
     "thread runs on.  True if it was committed, False if it was dropped\n"
     "(drop policy, lane full).  ValueError if it is longer than the ring's\n"
     "max_record."},
    {"consume", (PyCFunction)(void (*)(void))ring_map_consume, METH_VARARGS | METH_KEYWORDS,
     "consume($self, max=1024, timeout=None, records=False)\n--\n\n"
     "Acknowledge what was taken before, then take up to max records."},
    {"ack", (PyCFunction)ring_map_ack, METH_NOARGS,
     "ack($self, /)\n--\n\nAcknowledge every record taken so far."},
    {"pending", (PyCFunction)ring_map_pending, METH_NOARGS,
     "pending($self, /)\n--\n\nRecords taken and not yet acknowledged."},
    {"attach", (PyCFunction)ring_map_attach, METH_NOARGS,
     "attach($self, /)\n--\n\nBecome the consumer (the caller holds the lease)."},
    {"detach", (PyCFunction)ring_map_detach, METH_NOARGS,
     "detach($self, /)\n--\n\nStop being the consumer (without acknowledging)."},
    {"stats", (PyCFunction)ring_map_stats, METH_NOARGS, ring_map_stats_doc},
    {"lease", (PyCFunction)ring_map_lease, METH_NOARGS,
     "lease($self, /)\n--\n\n(pid, start time) of the consumer lease, (0, 0) if free."},
    {"lease_cas", (PyCFunction)ring_map_lease_cas, METH_VARARGS, ring_map_lease_cas_doc},
    {"_bench_put", (PyCFunction)ring_map_bench_put, METH_VARARGS, ring_map_bench_put_doc},
    {"waiting", (PyCFunction)ring_map_waiting, METH_NOARGS,
     "waiting($self, /)\n--\n\nThe consumer's waiting flag (tests)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot ring_map_slots[] = {
    {Py_tp_new, ring_map_new},
    {Py_tp_dealloc, ring_map_dealloc},
    {Py_tp_methods, ring_map_methods},
    {Py_tp_doc, (void *)"The mapped, validated layout of a ring (internal: use rseq.Ring)."},
    {0, NULL},
};

static PyType_Spec ring_map_spec = {
    .name = RSEQ_TYPE_NAME("_RingMap"),
    .basicsize = sizeof(RingMapObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = ring_map_slots,
};

/* The C API's producer: a handle is the struct ring inside a _RingMap (kept
 * alive by the caller's reference to the Python object). */
void *rseq_ring_handle(PyObject *obj)
{
    PyObject *map = obj;
    PyObject *attr = NULL;
    if (!RingMap_type || !Py_IS_TYPE(obj, RingMap_type)) {
        attr = PyObject_GetAttrString(obj, "_map");
        if (!attr) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "ring_handle() takes an rseq.Ring");
            return NULL;
        }
        map = attr;
    }
    if (!RingMap_type || !Py_IS_TYPE(map, RingMap_type)) {
        Py_XDECREF(attr);
        PyErr_SetString(PyExc_TypeError, map == Py_None ? "the ring is closed"
                                                        : "ring_handle() takes an rseq.Ring");
        return NULL;
    }
    RingMapObject *m = (RingMapObject *)map;
    Py_XDECREF(attr); /* the Ring keeps its _map alive while the caller holds the Ring */
    if (m->readonly) {
        PyErr_SetString(PyExc_PermissionError, "this ring was opened read-only");
        return NULL;
    }
    return &m->ring;
}

int rseq_ring_put(void *handle, const void *data, size_t length)
{
    const struct ring *r = handle;
    if (length > r->max_record)
        return -EMSGSIZE;
    uint32_t need = ring_record_size((uint32_t)length);
    char stack[2048] __attribute__((aligned(16)));
    char *record = need <= sizeof stack ? stack : malloc(need);
    if (!record)
        return -ENOMEM;
    memcpy(record + RING_RECORD_HEADER, data, length);
    memset(record + RING_RECORD_HEADER + length, 0, need - RING_RECORD_HEADER - length);
    pthread_once(&ring_pid_once, ring_pid_init);
    struct rseq_abi *rs = counter_thread_area();
    int ret = ring_put_record(r, rs, record, (uint32_t)length, ring_pid);
    if (record != stack)
        free(record);
    if (__builtin_expect(rs != NULL && rseq_area_lost(rs), 0))
        counter_thread_area_recheck();
    return ret == RING_PUT_CORRUPT ? -EUCLEAN : ret;
}

int rseq_ring_add_types(PyObject *module)
{
    PyObject *map = PyType_FromModuleAndSpec(module, &ring_map_spec, NULL);
    if (!map)
        return -1;
    int ret = PyModule_AddObjectRef(module, "_RingMap", map);
    RingMap_type = (PyTypeObject *)map;
    Py_DECREF(map);
    if (ret < 0)
        return -1;
    if (!RingRecord_type) {
        RingRecord_type = PyStructSequence_NewType(&record_desc);
        if (!RingRecord_type)
            return -1;
    }
    if (PyModule_AddObjectRef(module, "RingRecord", (PyObject *)RingRecord_type) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "RING_RECORD_HEADER", RING_RECORD_HEADER) < 0
        || PyModule_AddIntConstant(module, "RING_LANE_CONTROL", RING_LANE_CONTROL) < 0
        || PyModule_AddIntConstant(module, "RING_CONTROL_SIZE", RING_CONTROL_SIZE) < 0
        || PyModule_AddIntConstant(module, "RING_MAX_SIZE", RING_MAX_SIZE) < 0)
        return -1;
    return 0;
}
