/*
 * metrics.c - the C half of rseq.metrics: the mapped metrics file
 * (_MetricsMap: bounds-checked atomics and sums over the per-CPU words) and
 * the base types whose methods are the hot paths of the prometheus_client
 * compatible classes (rseq.metrics.Counter subclasses _CounterBase, and so
 * on): inc(), set(), observe() and labels() are C methods, so a call costs
 * what a call of a builtin method costs, plus the sequence.
 *
 * The file layout, the catalog and everything that happens rarely (declaring
 * a family, creating a series, claiming a process entry) are in Python
 * (src/rseq/metrics/_storage.py); this file trusts no offset it is given: the
 * map checks its layout against the buffer, and every bind and read checks
 * its word, cell or exemplar index against the layout.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <structmember.h>

#include <math.h>
#include <pthread.h>
#include <string.h>

#include "core.h"
#include "counter_type.h"
#include "metric_words.h"
#include "metrics_type.h"

/* Incremented in every child after fork(): a gauge bound before the fork
 * writes to its parent's per-process cell, so it rebinds (lazily, on its
 * next write) when its generation is not this one. */
static uint64_t fork_generation = 1;
static void metrics_atfork_child(void) { fork_generation++; }

/* ------------------------------------------------------------------------
 * _MetricsMap
 * ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    int writable;
    char *base;
    uint64_t length;
    struct metric_words words;
    uint64_t nwords;
    struct metric_cell *cells;
    uint64_t ncells;
    struct metric_exemplar *exemplars;
    uint64_t nexemplars;
} MetricsMapObject;

static int range_ok(uint64_t offset, uint64_t count, uint64_t size, uint64_t length)
{
    uint64_t bytes, end;
    return !__builtin_mul_overflow(count, size, &bytes)
        && !__builtin_add_overflow(offset, bytes, &end) && end <= length;
}

static PyObject *metrics_map_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "writable", "regions_offset", "region_size", "ncpu",
                             "lanes_offset", "nwords", "cells_offset", "ncells",
                             "exemplars_offset", "nexemplars", NULL};
    PyObject *buffer;
    int writable;
    unsigned long long regions_offset, region_size, lanes_offset, nwords, cells_offset,
        ncells, exemplars_offset, nexemplars;
    unsigned int ncpu;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OpKKIKKKKKK:_MetricsMap", kwlist, &buffer,
                                     &writable, &regions_offset, &region_size, &ncpu,
                                     &lanes_offset, &nwords, &cells_offset, &ncells,
                                     &exemplars_offset, &nexemplars))
        return NULL;
    MetricsMapObject *m = (MetricsMapObject *)type->tp_alloc(type, 0);
    if (!m)
        return NULL;
    if (PyObject_GetBuffer(buffer, &m->view,
                           writable ? PyBUF_WRITABLE | PyBUF_SIMPLE : PyBUF_SIMPLE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    m->have_view = 1;
    m->writable = writable;
    m->base = m->view.buf;
    m->length = (uint64_t)m->view.len;
    rseq_module_state *st = PyType_GetModuleState(type);
    const char *problem = NULL;
    if (ncpu == 0 || nwords == 0 || nwords > UINT32_MAX)
        problem = "CPU count and word count must be positive (and words below 2**32)";
    else if (((uintptr_t)m->base) % 64 || regions_offset % 64 || region_size % 64
             || lanes_offset % 64 || cells_offset % 64 || exemplars_offset % 64)
        problem = "offsets must be 64-byte aligned";
    else if (region_size < nwords * 8)
        problem = "a per-CPU region cannot hold its words";
    else if (!range_ok(regions_offset, ncpu, region_size, m->length)
             || !range_ok(lanes_offset, nwords, 8, m->length)
             || !range_ok(cells_offset, ncells, sizeof(struct metric_cell), m->length)
             || !range_ok(exemplars_offset, nexemplars, METRIC_EXEMPLAR_SIZE, m->length))
        problem = "a region lies outside the mapping";
    if (problem) {
        PyErr_Format(st->ArenaFormatError, "metrics file layout: %s", problem);
        Py_DECREF(m);
        return NULL;
    }
    m->words.regions = m->base + regions_offset;
    m->words.region_size = region_size;
    m->words.nslots = ncpu;
    m->words.lanes = (int64_t *)(m->base + lanes_offset);
    m->nwords = nwords;
    m->cells = (struct metric_cell *)(m->base + cells_offset);
    m->ncells = ncells;
    m->exemplars = (struct metric_exemplar *)(m->base + exemplars_offset);
    m->nexemplars = nexemplars;
    return (PyObject *)m;
}

static void metrics_map_dealloc(MetricsMapObject *m)
{
    PyTypeObject *type = Py_TYPE(m);
    if (m->have_view)
        PyBuffer_Release(&m->view);
    type->tp_free((PyObject *)m);
    Py_DECREF(type);
}

static int refuse_readonly(MetricsMapObject *m)
{
    if (m->writable)
        return 0;
    PyErr_SetString(PyExc_PermissionError, "the metrics file is open read-only");
    return -1;
}

/* An 8-byte word at a byte offset: aligned and inside the mapping. */
static uint64_t *word_at(MetricsMapObject *m, unsigned long long offset)
{
    if (offset % 8 || offset + 8 > m->length || offset + 8 < offset) {
        PyErr_Format(PyExc_IndexError, "offset %llu is not an aligned word of the mapping",
                     offset);
        return NULL;
    }
    return (uint64_t *)(m->base + offset);
}

static PyObject *metrics_map_load(MetricsMapObject *m, PyObject *arg)
{
    unsigned long long offset = PyLong_AsUnsignedLongLong(arg);
    if (offset == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    uint64_t *w = word_at(m, offset);
    return w ? PyLong_FromUnsignedLongLong(__atomic_load_n(w, __ATOMIC_ACQUIRE)) : NULL;
}

static PyObject *metrics_map_store(MetricsMapObject *m, PyObject *args)
{
    unsigned long long offset, value;
    if (!PyArg_ParseTuple(args, "KK:store", &offset, &value) || refuse_readonly(m) < 0)
        return NULL;
    uint64_t *w = word_at(m, offset);
    if (!w)
        return NULL;
    __atomic_store_n(w, value, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *metrics_map_cas(MetricsMapObject *m, PyObject *args)
{
    unsigned long long offset, expect, value;
    if (!PyArg_ParseTuple(args, "KKK:cas", &offset, &expect, &value) || refuse_readonly(m) < 0)
        return NULL;
    uint64_t *w = word_at(m, offset);
    if (!w)
        return NULL;
    uint64_t seen = expect;
    int ok = __atomic_compare_exchange_n(w, &seen, value, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE);
    return PyBool_FromLong(ok);
}

static PyObject *metrics_map_fetch_add(MetricsMapObject *m, PyObject *args)
{
    unsigned long long offset, n;
    if (!PyArg_ParseTuple(args, "KK:fetch_add", &offset, &n) || refuse_readonly(m) < 0)
        return NULL;
    uint64_t *w = word_at(m, offset);
    if (!w)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_fetch_add(w, n, __ATOMIC_ACQ_REL));
}

static int words_ok(MetricsMapObject *m, unsigned long long word, unsigned long long n)
{
    if (n > m->nwords || word > m->nwords - n) {
        PyErr_Format(PyExc_IndexError, "words %llu..%llu outside the %llu of the file", word,
                     word + n, (unsigned long long)m->nwords);
        return 0;
    }
    return 1;
}

static PyObject *metrics_map_read_ints(MetricsMapObject *m, PyObject *args)
{
    unsigned long long word, n;
    if (!PyArg_ParseTuple(args, "KK:read_ints", &word, &n) || !words_ok(m, word, n))
        return NULL;
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (uint64_t i = 0; list && i < n; i++) {
        PyObject *v = rseq_int128_to_pylong(metric_read_int(&m->words, word + i));
        if (!v)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    return list;
}

static PyObject *metrics_map_read_floats(MetricsMapObject *m, PyObject *args)
{
    unsigned long long word, n;
    if (!PyArg_ParseTuple(args, "KK:read_floats", &word, &n) || !words_ok(m, word, n))
        return NULL;
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (uint64_t i = 0; list && i < n; i++) {
        PyObject *v = PyFloat_FromDouble(metric_read_double(&m->words, word + i));
        if (!v)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    return list;
}

/* The scrape's bulk reads: one call per family instead of several per
 * series.  A series whose state word's lane is 1 (removed) reads as None. */
static int series_word(MetricsMapObject *m, PyObject *item, uint64_t span, uint64_t *out)
{
    unsigned long long w = PyLong_AsUnsignedLongLong(item);
    if (w == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (!words_ok(m, w, span))
        return -1;
    *out = w;
    return 0;
}

static PyObject *metrics_map_read_counters(MetricsMapObject *m, PyObject *words)
{
    PyObject *seq = PySequence_Fast(words, "read_counters: a list of words");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list && i < n; i++) {
        uint64_t w;
        PyObject *v;
        if (series_word(m, PySequence_Fast_GET_ITEM(seq, i), 3, &w) < 0) {
            Py_CLEAR(list);
            break;
        }
        if (__atomic_load_n(&m->words.lanes[w + 2], __ATOMIC_ACQUIRE) == 1)
            v = Py_NewRef(Py_None);
        else
            v = PyFloat_FromDouble((double)metric_read_int(&m->words, w)
                                   + metric_read_double(&m->words, w + 1));
        if (!v)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, v);
    }
    Py_DECREF(seq);
    return list;
}

static PyObject *metrics_map_read_observations(MetricsMapObject *m, PyObject *args)
{
    PyObject *words;
    unsigned int nb;
    if (!PyArg_ParseTuple(args, "OI:read_observations", &words, &nb))
        return NULL;
    if (nb == 0 || nb > 100000) {
        PyErr_SetString(PyExc_ValueError, "read_observations: 1 to 100000 buckets");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(words, "read_observations: a list of words");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list && i < n; i++) {
        uint64_t w;
        PyObject *v;
        if (series_word(m, PySequence_Fast_GET_ITEM(seq, i), (uint64_t)nb + 2, &w) < 0) {
            Py_CLEAR(list);
            break;
        }
        if (__atomic_load_n(&m->words.lanes[w + nb + 1], __ATOMIC_ACQUIRE) == 1) {
            v = Py_NewRef(Py_None);
        } else {
            /* [cumulative count of each bucket..., sum] */
            v = PyList_New((Py_ssize_t)nb + 1);
            __int128 running = 0;
            for (uint32_t b = 0; v && b < nb; b++) {
                running += metric_read_int(&m->words, w + b);
                PyObject *f = PyFloat_FromDouble((double)running);
                if (!f)
                    Py_CLEAR(v);
                else
                    PyList_SET_ITEM(v, b, f);
            }
            if (v) {
                PyObject *f = PyFloat_FromDouble(metric_read_double(&m->words, w + nb));
                if (!f)
                    Py_CLEAR(v);
                else
                    PyList_SET_ITEM(v, nb, f);
            }
        }
        if (!v)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, v);
    }
    Py_DECREF(seq);
    return list;
}

static struct metric_cell *cell_at(MetricsMapObject *m, unsigned long long i)
{
    if (i >= m->ncells) {
        PyErr_Format(PyExc_IndexError, "gauge cell %llu outside the %llu of the file", i,
                     (unsigned long long)m->ncells);
        return NULL;
    }
    return &m->cells[i];
}

static PyObject *metrics_map_read_cell(MetricsMapObject *m, PyObject *arg)
{
    unsigned long long i = PyLong_AsUnsignedLongLong(arg);
    if (i == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    struct metric_cell *c = cell_at(m, i);
    if (!c)
        return NULL;
    return Py_BuildValue(
        "(ddK)", metric_bits_to_double(__atomic_load_n(&c->value, __ATOMIC_RELAXED)),
        metric_bits_to_double(__atomic_load_n(&c->timestamp, __ATOMIC_RELAXED)),
        (unsigned long long)__atomic_load_n(&c->gen, __ATOMIC_ACQUIRE));
}

static PyObject *metrics_map_reset_cell(MetricsMapObject *m, PyObject *args)
{
    unsigned long long i, gen;
    if (!PyArg_ParseTuple(args, "KK:reset_cell", &i, &gen) || refuse_readonly(m) < 0)
        return NULL;
    struct metric_cell *c = cell_at(m, i);
    if (!c)
        return NULL;
    __atomic_store_n(&c->value, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->timestamp, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->gen, gen, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *metrics_map_write_exemplar(MetricsMapObject *m, PyObject *args)
{
    unsigned long long i;
    const char *labels;
    Py_ssize_t length;
    double value, timestamp;
    if (!PyArg_ParseTuple(args, "Ky#dd:write_exemplar", &i, &labels, &length, &value,
                          &timestamp) || refuse_readonly(m) < 0)
        return NULL;
    if (i >= m->nexemplars) {
        PyErr_Format(PyExc_IndexError, "exemplar %llu outside the %llu of the file", i,
                     (unsigned long long)m->nexemplars);
        return NULL;
    }
    if (length > METRIC_EXEMPLAR_LABELS) {
        PyErr_Format(PyExc_ValueError, "exemplar labels of %zd bytes: at most %d", length,
                     METRIC_EXEMPLAR_LABELS);
        return NULL;
    }
    int dropped = metric_exemplar_write(&m->exemplars[i], labels, (uint32_t)length, value,
                                        timestamp);
    return PyBool_FromLong(!dropped);
}

static PyObject *metrics_map_read_exemplar(MetricsMapObject *m, PyObject *arg)
{
    unsigned long long i = PyLong_AsUnsignedLongLong(arg);
    if (i == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (i >= m->nexemplars) {
        PyErr_Format(PyExc_IndexError, "exemplar %llu outside the %llu of the file", i,
                     (unsigned long long)m->nexemplars);
        return NULL;
    }
    struct metric_exemplar copy;
    if (!metric_exemplar_read(&m->exemplars[i], &copy))
        Py_RETURN_NONE;
    return Py_BuildValue("(y#dd)", copy.labels, (Py_ssize_t)copy.length,
                         metric_bits_to_double(copy.value),
                         metric_bits_to_double(copy.timestamp));
}

static PyMethodDef metrics_map_methods[] = {
    {"load", (PyCFunction)metrics_map_load, METH_O,
     "load($self, offset, /)\n--\n\nThe 8-byte word at a byte offset (acquire)."},
    {"store", (PyCFunction)metrics_map_store, METH_VARARGS,
     "store($self, offset, value, /)\n--\n\nStore an 8-byte word (release)."},
    {"cas", (PyCFunction)metrics_map_cas, METH_VARARGS,
     "cas($self, offset, expect, value, /)\n--\n\nCompare-and-swap a word; True if done."},
    {"fetch_add", (PyCFunction)metrics_map_fetch_add, METH_VARARGS,
     "fetch_add($self, offset, n, /)\n--\n\nAtomically add to a word; the old value."},
    {"read_ints", (PyCFunction)metrics_map_read_ints, METH_VARARGS,
     "read_ints($self, word, n, /)\n--\n\nThe sums of n integer words."},
    {"read_floats", (PyCFunction)metrics_map_read_floats, METH_VARARGS,
     "read_floats($self, word, n, /)\n--\n\nThe sums of n float words."},
    {"read_counters", (PyCFunction)metrics_map_read_counters, METH_O,
     "read_counters($self, words, /)\n--\n\n"
     "The value of each counter series (its first word), None if removed."},
    {"read_observations", (PyCFunction)metrics_map_read_observations, METH_VARARGS,
     "read_observations($self, words, nbuckets, /)\n--\n\n"
     "[cumulative bucket counts..., sum] of each series, None if removed."},
    {"read_cell", (PyCFunction)metrics_map_read_cell, METH_O,
     "read_cell($self, index, /)\n--\n\n(value, timestamp, generation) of a gauge cell."},
    {"reset_cell", (PyCFunction)metrics_map_reset_cell, METH_VARARGS,
     "reset_cell($self, index, gen, /)\n--\n\nZero a gauge cell and give it a generation."},
    {"write_exemplar", (PyCFunction)metrics_map_write_exemplar, METH_VARARGS,
     "write_exemplar($self, index, labels, value, timestamp, /)\n--\n\n"
     "Write an exemplar; False if another writer was at it (dropped)."},
    {"read_exemplar", (PyCFunction)metrics_map_read_exemplar, METH_O,
     "read_exemplar($self, index, /)\n--\n\n(labels, value, timestamp) or None."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot metrics_map_slots[] = {
    {Py_tp_new, metrics_map_new},
    {Py_tp_dealloc, metrics_map_dealloc},
    {Py_tp_methods, metrics_map_methods},
    {Py_tp_doc, (void *)"The mapped, checked layout of a metrics file (internal)."},
    {0, NULL},
};

static PyType_Spec metrics_map_spec = {
    .name = RSEQ_TYPE_NAME("_MetricsMap"),
    .basicsize = sizeof(MetricsMapObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = metrics_map_slots,
};

/* ------------------------------------------------------------------------
 * The metric base types
 * ------------------------------------------------------------------------ */

enum { KIND_UNBOUND = 0, KIND_COUNTER, KIND_OBSERVE, KIND_GAUGE };

/* Free-threaded builds skip the cache (its entries are replaced without a
 * lock, which only the GIL makes safe); the dict lookup remains. */
#ifdef Py_GIL_DISABLED
#define LABELS_CACHE_ON 0
#else
#define LABELS_CACHE_ON 1
#endif
#define LABELS_CACHE 8
#define LABELS_CACHED_ARGS 4

typedef struct {
    PyObject_HEAD
    int kind;
    struct metric_words words;
    uint64_t word;              /* counter: int word, then float word; observe: buckets, sum */
    double *bounds;             /* observe: upper bounds, the last +Inf */
    uint32_t nbounds;
    int summary;                /* observe: every observation counts in bucket 0 */
    struct metric_cell *cell;   /* gauge */
    int timestamped;            /* gauge: keep the write time (mostrecent modes) */
    uint64_t fork_generation;   /* gauge: the generation it was bound in */
    PyObject *map;              /* the _MetricsMap keeping the memory mapped */
    PyObject *children;         /* labels(): tuple of label values -> child */
    /* labels() cache, compared by identity: call sites pass the same string
     * objects again and again (literals, interned names), so a hit costs a
     * few pointer compares instead of building and hashing a tuple.  Each
     * entry holds references to its strings, so their addresses cannot be
     * reused by other objects while cached. */
    struct {
        Py_ssize_t nargs;
        PyObject *args[LABELS_CACHED_ARGS];
        PyObject *child;
    } cache[LABELS_CACHE];
} MetricObject;

static PyObject *metric_new(PyTypeObject *type, PyObject *Py_UNUSED(args),
                            PyObject *Py_UNUSED(kwds))
{
    return type->tp_alloc(type, 0);
}

static void cache_clear(MetricObject *self)
{
    for (int i = 0; i < LABELS_CACHE; i++) {
        for (Py_ssize_t j = 0; j < self->cache[i].nargs; j++)
            Py_CLEAR(self->cache[i].args[j]);
        self->cache[i].nargs = 0;
        Py_CLEAR(self->cache[i].child);
    }
}

static int metric_traverse(MetricObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->map);
    Py_VISIT(self->children);
    for (int i = 0; i < LABELS_CACHE; i++)
        Py_VISIT(self->cache[i].child);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int metric_clear(MetricObject *self)
{
    cache_clear(self);
    Py_CLEAR(self->map);
    Py_CLEAR(self->children);
    return 0;
}

static void metric_dealloc(MetricObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    metric_clear(self);
    PyMem_Free(self->bounds);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* Hand the call to the Python method `name` (validation, exemplars, unbound
 * parents, unusual argument types): everything that is not the fast path. */
static PyObject *slow_path(MetricObject *self, const char *name, PyObject *const *args,
                           Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *small[8];
    PyObject **stack = small;
    if (nargs + nkw + 1 > 8) {
        stack = PyMem_New(PyObject *, nargs + nkw + 1);
        if (!stack)
            return PyErr_NoMemory();
    }
    stack[0] = (PyObject *)self;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++)
        stack[i + 1] = args[i];
    PyObject *method = PyUnicode_InternFromString(name);
    PyObject *result = method ? PyObject_VectorcallMethod(method, stack,
                                                          (size_t)(nargs + 1), kwnames)
                              : NULL;
    Py_XDECREF(method);
    if (stack != small)
        PyMem_Free(stack);
    return result;
}

static int bind_map(MetricObject *self, PyObject *map, PyTypeObject *map_type)
{
    if (!PyObject_TypeCheck(map, map_type)) {
        PyErr_SetString(PyExc_TypeError, "bind: not a _MetricsMap");
        return -1;
    }
    if (!((MetricsMapObject *)map)->writable) {
        PyErr_SetString(PyExc_PermissionError, "the metrics file is open read-only");
        return -1;
    }
    Py_XSETREF(self->map, Py_NewRef(map));
    self->words = ((MetricsMapObject *)map)->words;
    return 0;
}

/* ---- counters ---------------------------------------------------------- */

static PyObject *negative_amount(double x)
{
    if (isnan(x))
        PyErr_SetString(PyExc_ValueError,
                        "Counters cannot be incremented by NaN (OpenMetrics forbids NaN "
                        "counters).");
    else
        PyErr_SetString(PyExc_ValueError,
                        "Counters can only be incremented by non-negative amounts.");
    return NULL;
}

static PyObject *counter_inc(MetricObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    if (__builtin_expect(self->kind == KIND_COUNTER && kwnames == NULL, 1)) {
        if (nargs == 0) {
            if (__builtin_expect(metric_add_int(&self->words, self->word, 1) == 0, 1))
                Py_RETURN_NONE;
            metric_add_double(&self->words, self->word + 1, 1.0);
            Py_RETURN_NONE;
        }
        if (nargs == 1) {
            PyObject *a = args[0];
            if (PyLong_CheckExact(a)) {
                int overflow;
                long long n = PyLong_AsLongLongAndOverflow(a, &overflow);
                if (!overflow && !(n == -1 && PyErr_Occurred())) {
                    if (n < 0)
                        return negative_amount((double)n);
                    if (metric_add_int(&self->words, self->word, n) != 0)
                        metric_add_double(&self->words, self->word + 1, (double)n);
                    Py_RETURN_NONE;
                }
                PyErr_Clear();
            } else if (PyFloat_CheckExact(a)) {
                double x = PyFloat_AS_DOUBLE(a);
                if (!(x >= 0))
                    return negative_amount(x);
                metric_add_double(&self->words, self->word + 1, x);
                Py_RETURN_NONE;
            }
        }
    }
    return slow_path(self, "_inc_slow", args, nargs, kwnames);
}

/* ---- observations (histograms, summaries) ------------------------------ */

static inline void observe(MetricObject *self, double x)
{
    uint32_t bucket = 0;
    if (!self->summary) {
        uint32_t lo = 0, hi = self->nbounds;   /* first bound >= x, or nbounds */
        while (lo < hi) {
            uint32_t mid = (lo + hi) / 2;
            if (x <= self->bounds[mid])
                hi = mid;
            else
                lo = mid + 1;
        }
        bucket = lo;
    }
    if (bucket < self->nbounds)
        metric_add_int(&self->words, self->word + bucket, 1);
    metric_add_double(&self->words, self->word + self->nbounds, x);
}

static PyObject *metric_observe(MetricObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    if (__builtin_expect(self->kind == KIND_OBSERVE && kwnames == NULL && nargs == 1, 1)) {
        PyObject *a = args[0];
        if (PyFloat_CheckExact(a) && !isnan(PyFloat_AS_DOUBLE(a))) {
            observe(self, PyFloat_AS_DOUBLE(a));
            Py_RETURN_NONE;
        }
        if (PyLong_CheckExact(a)) {
            double x = PyLong_AsDouble(a);
            if (!(x == -1.0 && PyErr_Occurred())) {
                observe(self, x);
                Py_RETURN_NONE;
            }
            PyErr_Clear();
        }
    }
    return slow_path(self, "_observe_slow", args, nargs, kwnames);
}

/* ---- gauges ------------------------------------------------------------ */

/* 0 ready to write, -1 error.  After fork() the cell belongs to the parent:
 * ask the Python side for this process's cell first. */
static inline int gauge_ready(MetricObject *self)
{
    if (__builtin_expect(self->fork_generation == fork_generation, 1))
        return 0;
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_rebind", NULL);
    if (!r)
        return -1;
    Py_DECREF(r);
    if (self->kind != KIND_GAUGE || self->fork_generation != fork_generation) {
        PyErr_SetString(PyExc_RuntimeError, "gauge could not be rebound after fork()");
        return -1;
    }
    return 0;
}

static int number_argument(PyObject *a, double *out)
{
    if (PyFloat_CheckExact(a)) {
        *out = PyFloat_AS_DOUBLE(a);
        return 1;
    }
    if (PyLong_CheckExact(a)) {
        *out = PyLong_AsDouble(a);
        if (*out == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    return 0;
}

static PyObject *gauge_set(MetricObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    double x;
    if (__builtin_expect(self->kind == KIND_GAUGE && kwnames == NULL && nargs == 1, 1)
        && number_argument(args[0], &x)) {
        if (gauge_ready(self) < 0)
            return NULL;
        metric_cell_set(self->cell, x, self->timestamped);
        Py_RETURN_NONE;
    }
    return slow_path(self, "_set_slow", args, nargs, kwnames);
}

static PyObject *gauge_add(MetricObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames, double sign, const char *slow)
{
    double x = 1.0;
    if (__builtin_expect(self->kind == KIND_GAUGE && kwnames == NULL && nargs <= 1, 1)
        && (nargs == 0 || number_argument(args[0], &x))) {
        if (gauge_ready(self) < 0)
            return NULL;
        metric_cell_add(self->cell, sign * x, self->timestamped);
        Py_RETURN_NONE;
    }
    return slow_path(self, slow, args, nargs, kwnames);
}

static PyObject *gauge_inc(MetricObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    return gauge_add(self, args, nargs, kwnames, 1.0, "_inc_slow");
}

static PyObject *gauge_dec(MetricObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    return gauge_add(self, args, nargs, kwnames, -1.0, "_dec_slow");
}

static PyObject *gauge_set_to_current_time(MetricObject *self, PyObject *Py_UNUSED(unused))
{
    if (self->kind != KIND_GAUGE)
        return slow_path(self, "_set_slow", NULL, 0, NULL);
    if (gauge_ready(self) < 0)
        return NULL;
    metric_cell_set(self->cell, metric_now(), self->timestamped);
    Py_RETURN_NONE;
}

/* ---- labels() ---------------------------------------------------------- */

static inline unsigned cache_slot(PyObject *const *args, Py_ssize_t nargs)
{
    uintptr_t h = 0;
    for (Py_ssize_t i = 0; i < nargs; i++)
        h = h * 31 + ((uintptr_t)args[i] >> 4);
    return (unsigned)((h ^ (h >> 7)) % LABELS_CACHE);
}

static PyObject *metric_labels(MetricObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    if (kwnames == NULL && nargs > 0 && self->children && PyDict_CheckExact(self->children)) {
        unsigned slot = 0;
        int cached = LABELS_CACHE_ON && nargs <= LABELS_CACHED_ARGS;
        if (cached) {
            slot = cache_slot(args, nargs);
            if (self->cache[slot].nargs == nargs) {
                Py_ssize_t i = 0;
                while (i < nargs && self->cache[slot].args[i] == args[i])
                    i++;
                if (i == nargs)
                    return Py_NewRef(self->cache[slot].child);
            }
        }
        for (Py_ssize_t i = 0; i < nargs; i++)
            if (!PyUnicode_CheckExact(args[i]))
                goto slow;
        PyObject *key = PyTuple_New(nargs);
        if (!key)
            return NULL;
        for (Py_ssize_t i = 0; i < nargs; i++)
            PyTuple_SET_ITEM(key, i, Py_NewRef(args[i]));
        PyObject *child = PyDict_GetItemWithError(self->children, key);
        Py_DECREF(key);
        if (child) {
            if (cached) {
                PyObject *old_args[LABELS_CACHED_ARGS];
                Py_ssize_t old_n = self->cache[slot].nargs;
                PyObject *old_child = self->cache[slot].child;
                for (Py_ssize_t i = 0; i < old_n; i++)
                    old_args[i] = self->cache[slot].args[i];
                for (Py_ssize_t i = 0; i < nargs; i++)
                    self->cache[slot].args[i] = Py_NewRef(args[i]);
                self->cache[slot].nargs = nargs;
                self->cache[slot].child = Py_NewRef(child);
                /* Released last: a destructor may run arbitrary code. */
                for (Py_ssize_t i = 0; i < old_n; i++)
                    Py_DECREF(old_args[i]);
                Py_XDECREF(old_child);
            }
            return Py_NewRef(child);
        }
        if (PyErr_Occurred())
            return NULL;
    }
slow:
    return slow_path(self, "_labels_slow", args, nargs, kwnames);
}

static PyObject *metric_forget_children(MetricObject *self, PyObject *Py_UNUSED(unused))
{
    cache_clear(self);
    Py_RETURN_NONE;
}

/* ---- binding (called by the Python layer) ------------------------------ */

static PyTypeObject *module_map_type(MetricObject *self);

static PyObject *metric_bind_counter(MetricObject *self, PyObject *args)
{
    PyObject *map;
    unsigned long long word;
    if (!PyArg_ParseTuple(args, "OK:_bind_counter", &map, &word))
        return NULL;
    if (bind_map(self, map, module_map_type(self)) < 0
        || !words_ok((MetricsMapObject *)map, word, 2))
        return NULL;
    self->word = word;
    self->kind = KIND_COUNTER;
    Py_RETURN_NONE;
}

static PyObject *metric_bind_observe(MetricObject *self, PyObject *args)
{
    PyObject *map, *bounds;
    unsigned long long word;
    int summary;
    if (!PyArg_ParseTuple(args, "OKO!p:_bind_observe", &map, &word, &PyTuple_Type, &bounds,
                          &summary))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(bounds);
    if (n < 1 || n > 100000) {
        PyErr_SetString(PyExc_ValueError, "_bind_observe: 1 to 100000 bounds");
        return NULL;
    }
    if (bind_map(self, map, module_map_type(self)) < 0
        || !words_ok((MetricsMapObject *)map, word, (unsigned long long)n + 1))
        return NULL;
    double *values = PyMem_New(double, n);
    if (!values)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        values[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (values[i] == -1.0 && PyErr_Occurred()) {
            PyMem_Free(values);
            return NULL;
        }
    }
    PyMem_Free(self->bounds);
    self->bounds = values;
    self->nbounds = (uint32_t)n;
    self->summary = summary;
    self->word = word;
    self->kind = KIND_OBSERVE;
    Py_RETURN_NONE;
}

static PyObject *metric_bind_gauge(MetricObject *self, PyObject *args)
{
    PyObject *map;
    unsigned long long index;
    int timestamped;
    if (!PyArg_ParseTuple(args, "OKp:_bind_gauge", &map, &index, &timestamped))
        return NULL;
    if (bind_map(self, map, module_map_type(self)) < 0)
        return NULL;
    struct metric_cell *cell = cell_at((MetricsMapObject *)map, index);
    if (!cell)
        return NULL;
    self->cell = cell;
    self->timestamped = timestamped;
    self->fork_generation = fork_generation;
    self->kind = KIND_GAUGE;
    Py_RETURN_NONE;
}

static PyObject *metric_get(MetricObject *self, PyObject *Py_UNUSED(unused))
{
    switch (self->kind) {
    case KIND_COUNTER: {
        __int128 n = metric_read_int(&self->words, self->word);
        return PyFloat_FromDouble((double)n + metric_read_double(&self->words, self->word + 1));
    }
    case KIND_GAUGE:
        if (gauge_ready(self) < 0)
            return NULL;
        return PyFloat_FromDouble(
            metric_bits_to_double(__atomic_load_n(&self->cell->value, __ATOMIC_RELAXED)));
    case KIND_OBSERVE: {
        __int128 count = 0;
        for (uint32_t i = 0; i < self->nbounds; i++)
            count += metric_read_int(&self->words, self->word + i);
        return Py_BuildValue("(dd)", (double)count,
                             metric_read_double(&self->words, self->word + self->nbounds));
    }
    default:
        Py_RETURN_NONE;
    }
}

static PyObject *metric_get_bound(MetricObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->kind != KIND_UNBOUND);
}

static PyObject *metric_get_fork_generation(PyObject *Py_UNUSED(self), void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(fork_generation);
}

#define FASTCALL_KW METH_FASTCALL | METH_KEYWORDS
#define METRIC_COMMON_METHODS \
    {"labels", (PyCFunction)(void (*)(void))metric_labels, FASTCALL_KW, \
     "labels($self, /, *labelvalues, **labelkwargs)\n--\n\n" \
     "The child of this labelled metric for these label values (created on first use)."}, \
    {"_get", (PyCFunction)metric_get, METH_NOARGS, \
     "_get($self, /)\n--\n\nThis child's value (counter, gauge) or (count, sum)."}, \
    {"_bind_counter", (PyCFunction)metric_bind_counter, METH_VARARGS, NULL}, \
    {"_forget_children", (PyCFunction)metric_forget_children, METH_NOARGS, \
     "Empty the labels() cache (after remove() or clear())."}, \
    {"_bind_observe", (PyCFunction)metric_bind_observe, METH_VARARGS, NULL}, \
    {"_bind_gauge", (PyCFunction)metric_bind_gauge, METH_VARARGS, NULL},

static PyMethodDef counter_methods[] = {
    {"inc", (PyCFunction)(void (*)(void))counter_inc, FASTCALL_KW,
     "inc($self, /, amount=1, exemplar=None)\n--\n\n"
     "Add a non-negative amount (default 1) on the calling thread's CPU."},
    METRIC_COMMON_METHODS
    {NULL, NULL, 0, NULL},
};

static PyMethodDef observe_methods[] = {
    {"observe", (PyCFunction)(void (*)(void))metric_observe, FASTCALL_KW,
     "observe($self, /, amount, exemplar=None)\n--\n\nRecord an observation."},
    METRIC_COMMON_METHODS
    {NULL, NULL, 0, NULL},
};

static PyMethodDef gauge_methods[] = {
    {"set", (PyCFunction)(void (*)(void))gauge_set, FASTCALL_KW,
     "set($self, /, value)\n--\n\nSet this process's value."},
    {"inc", (PyCFunction)(void (*)(void))gauge_inc, FASTCALL_KW,
     "inc($self, /, amount=1)\n--\n\nAdd to this process's value."},
    {"dec", (PyCFunction)(void (*)(void))gauge_dec, FASTCALL_KW,
     "dec($self, /, amount=1)\n--\n\nSubtract from this process's value."},
    {"set_to_current_time", (PyCFunction)gauge_set_to_current_time, METH_NOARGS,
     "set_to_current_time($self, /)\n--\n\nSet to the current Unix time in seconds."},
    METRIC_COMMON_METHODS
    {NULL, NULL, 0, NULL},
};

static PyMemberDef metric_members[] = {
    {"_children", T_OBJECT, offsetof(MetricObject, children), 0,
     "label values -> child (the labels() fast path)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef metric_getset[] = {
    {"_bound", (getter)metric_get_bound, NULL, "True once bound to storage.", NULL},
    {"_fork_generation", (getter)metric_get_fork_generation, NULL,
     "How many fork()s this process descends from, plus one.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#define METRIC_SLOTS(methods, doc) { \
    {Py_tp_new, metric_new}, \
    {Py_tp_dealloc, metric_dealloc}, \
    {Py_tp_traverse, metric_traverse}, \
    {Py_tp_clear, metric_clear}, \
    {Py_tp_methods, methods}, \
    {Py_tp_members, metric_members}, \
    {Py_tp_getset, metric_getset}, \
    {Py_tp_doc, (void *)doc}, \
    {0, NULL}, \
}

static PyType_Slot counter_slots[] = METRIC_SLOTS(counter_methods,
    "The C base of rseq.metrics.Counter (internal).");
static PyType_Slot observe_slots[] = METRIC_SLOTS(observe_methods,
    "The C base of rseq.metrics.Histogram and Summary (internal).");
static PyType_Slot gauge_slots[] = METRIC_SLOTS(gauge_methods,
    "The C base of rseq.metrics.Gauge (internal).");

#define METRIC_SPEC(pyname, slot_table) { \
    .name = RSEQ_TYPE_NAME(pyname), \
    .basicsize = sizeof(MetricObject), \
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, \
    .slots = slot_table, \
}

static PyType_Spec counter_spec = METRIC_SPEC("_CounterBase", counter_slots);
static PyType_Spec observe_spec = METRIC_SPEC("_ObserveBase", observe_slots);
static PyType_Spec gauge_spec = METRIC_SPEC("_GaugeBase", gauge_slots);

/* The _MetricsMap type of the module the metric's type belongs to. */
static PyTypeObject *metrics_map_type;

static PyTypeObject *module_map_type(MetricObject *Py_UNUSED(self))
{
    return metrics_map_type;
}

/* CPython 3.11+ specialises a call of a method descriptor only while self's
 * type IS the descriptor's type: on an instance of a Python subclass
 * (rseq.metrics.Counter of _CounterBase) every c.inc() would de-optimise
 * and take the generic call path, about 60 % slower.  So the subclass gets
 * its own descriptors of the same C functions, made for it. */
static PyObject *metrics_specialize(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "_specialize_metric_methods: a class");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)cls;
    PyMethodDef *tables[] = {counter_methods, observe_methods, gauge_methods};
    const char *bases[] = {"_CounterBase", "_ObserveBase", "_GaugeBase"};
    for (int t = 0; t < 3; t++) {
        PyObject *base = PyObject_GetAttrString(module, bases[t]);
        if (!base)
            return NULL;
        int is_sub = PyType_IsSubtype(type, (PyTypeObject *)base);
        Py_DECREF(base);
        if (!is_sub)
            continue;
        for (PyMethodDef *def = tables[t]; def->ml_name; def++) {
            if (def->ml_name[0] == '_')
                continue;
            PyObject *descr = PyDescr_NewMethod(type, def);
            if (!descr)
                return NULL;
            int err = PyObject_SetAttrString(cls, def->ml_name, descr);
            Py_DECREF(descr);
            if (err < 0)
                return NULL;
        }
        Py_RETURN_NONE;
    }
    PyErr_SetString(PyExc_TypeError, "_specialize_metric_methods: not a metric class");
    return NULL;
}

PyMethodDef rseq_metrics_functions[] = {
    {"_specialize_metric_methods", metrics_specialize, METH_O,
     "_specialize_metric_methods($module, cls, /)\n--\n\n"
     "Give a subclass of a metric base type its own descriptors of the hot\n"
     "methods, so that CPython specialises their calls (internal)."},
    {NULL, NULL, 0, NULL},
};

int rseq_metrics_add_types(PyObject *module)
{
    static int atfork_done;
    if (!atfork_done) {
        if (pthread_atfork(NULL, NULL, metrics_atfork_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return -1;
        }
        atfork_done = 1;
    }
    PyObject *map = PyType_FromModuleAndSpec(module, &metrics_map_spec, NULL);
    if (!map)
        return -1;
    /* One interpreter per process (see core.h): a static reference is the
     * module's own, kept for the process's life. */
    metrics_map_type = (PyTypeObject *)Py_NewRef(map);
    int ret = PyModule_AddObjectRef(module, "_MetricsMap", map);
    Py_DECREF(map);
    if (ret < 0)
        return -1;
    PyType_Spec *specs[] = {&counter_spec, &observe_spec, &gauge_spec};
    const char *names[] = {"_CounterBase", "_ObserveBase", "_GaugeBase"};
    for (int i = 0; i < 3; i++) {
        PyObject *type = PyType_FromModuleAndSpec(module, specs[i], NULL);
        if (!type)
            return -1;
        ret = PyModule_AddObjectRef(module, names[i], type);
        Py_DECREF(type);
        if (ret < 0)
            return -1;
    }
    if (PyModule_AddFunctions(module, rseq_metrics_functions) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "METRIC_EXEMPLAR_LABELS", METRIC_EXEMPLAR_LABELS);
}
