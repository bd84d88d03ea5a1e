/*
 * counter.c - rseq.PerCpuCounter (in-process) and the methods it shares with
 * rseq.ArenaCounter (shared memory, arena.c).
 *
 * In-process counters take their slots from a private pool laid out like an
 * arena: chunks of POOL_CHUNK counters, one 4 KiB region per possible CPU
 * per chunk, so a counter costs 8 bytes per possible CPU (plus 32 bytes of
 * fallback lane and baseline) and CPUs never write each other's lines.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "core.h"
#include "counter.h"
#include "counter_type.h"

/* ------------------------------------------------------------------------
 * The private slot pool
 * ------------------------------------------------------------------------ */

#define POOL_CHUNK 512
#define POOL_REGION_SIZE (POOL_CHUNK * 8)

struct pool_meta {
    int64_t fallback;
    int64_t reserved;
    __int128 baseline;
};

struct pool_chunk {
    char *regions;
    struct pool_meta *meta;
};

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static struct pool_chunk *pool_chunks;
static uint32_t pool_nchunks, pool_next;
static uint32_t *pool_free;
static uint32_t pool_nfree, pool_free_capacity;
static uint32_t pool_ncpus;

/* A fork while another thread holds the lock must not leave it held in the
 * child. */
static void pool_prefork(void) { pthread_mutex_lock(&pool_lock); }
static void pool_postfork(void) { pthread_mutex_unlock(&pool_lock); }

static void pool_init(void)
{
    pool_ncpus = (uint32_t)rseq_possible_cpus();
    pthread_atfork(pool_prefork, pool_postfork, pool_postfork);
}

static int pool_grow(void)
{
    struct pool_chunk *chunks = realloc(pool_chunks, (pool_nchunks + 1) * sizeof *chunks);
    if (!chunks)
        return -1;
    pool_chunks = chunks;
    char *regions = mmap(NULL, (size_t)pool_ncpus * POOL_REGION_SIZE,
                         PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (regions == MAP_FAILED)
        return -1;
    struct pool_meta *meta = NULL;
    if (posix_memalign((void **)&meta, 64, POOL_CHUNK * sizeof *meta) != 0) {
        munmap(regions, (size_t)pool_ncpus * POOL_REGION_SIZE);
        return -1;
    }
    memset(meta, 0, POOL_CHUNK * sizeof *meta);
    pool_chunks[pool_nchunks].regions = regions;
    pool_chunks[pool_nchunks].meta = meta;
    pool_nchunks++;
    return 0;
}

/* Fill `slots` with a fresh zeroed counter; 0 or -1 (out of memory). */
static int pool_take(struct counter_slots *slots, uint32_t *id, enum rseq_index_mode mode)
{
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool_lock);
    uint32_t g;
    if (pool_nfree) {
        g = pool_free[--pool_nfree];
    } else {
        if (pool_next == pool_nchunks * POOL_CHUNK && pool_grow() < 0) {
            pthread_mutex_unlock(&pool_lock);
            return -1;
        }
        g = pool_next++;
    }
    struct pool_chunk *chunk = &pool_chunks[g / POOL_CHUNK];
    pthread_mutex_unlock(&pool_lock);
    uint32_t i = g % POOL_CHUNK;
    slots->regions = chunk->regions;
    slots->region_size = POOL_REGION_SIZE;
    slots->nslots = pool_ncpus;
    slots->index = i;
    slots->fallback = &chunk->meta[i].fallback;
    slots->baseline = &chunk->meta[i].baseline;
    slots->mode = mode;
    *id = g;
    return 0;
}

/* Return a counter's slots.  Its object is gone, so no thread can be adding
 * to it: zeroing with plain stores is safe. */
static void pool_give_back(struct counter_slots *slots, uint32_t id)
{
    for (uint32_t cpu = 0; cpu < slots->nslots; cpu++)
        *counter_slot(slots, cpu) = 0;
    *slots->fallback = 0;
    *slots->baseline = 0;
    pthread_mutex_lock(&pool_lock);
    if (pool_nfree == pool_free_capacity) {
        uint32_t cap = pool_free_capacity ? pool_free_capacity * 2 : 64;
        uint32_t *grown = realloc(pool_free, cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&pool_lock);
            return; /* the slot is leaked, never reused twice */
        }
        pool_free = grown;
        pool_free_capacity = cap;
    }
    pool_free[pool_nfree++] = id;
    pthread_mutex_unlock(&pool_lock);
}

/* ------------------------------------------------------------------------
 * Shared methods (PerCpuCounter and ArenaCounter)
 * ------------------------------------------------------------------------ */

PyObject *rseq_int128_to_pylong(__int128 v)
{
    if (v >= INT64_MIN && v <= INT64_MAX)
        return PyLong_FromLongLong((long long)v);
    /* hi * 2**64 + lo, with hi the floor (arithmetic shift) */
    PyObject *hi = PyLong_FromLongLong((long long)(v >> 64));
    PyObject *lo = PyLong_FromUnsignedLongLong((unsigned long long)v);
    PyObject *shift = PyLong_FromLong(64);
    PyObject *shifted = hi && shift ? PyNumber_Lshift(hi, shift) : NULL;
    PyObject *result = shifted && lo ? PyNumber_Add(shifted, lo) : NULL;
    Py_XDECREF(hi);
    Py_XDECREF(lo);
    Py_XDECREF(shift);
    Py_XDECREF(shifted);
    return result;
}

/* add(n=1): METH_FASTCALL | METH_KEYWORDS without the argument-clinic
 * machinery: this is the hot path the benchmark compares with {}.get(1). */
PyObject *rseq_counter_add(CounterObject *self, PyObject *const *args,
                           Py_ssize_t nargs, PyObject *kwnames)
{
    long long n = 1;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw) {
        if (nargs + nkw > 1
            || (nkw && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "n") != 0)) {
            PyErr_SetString(PyExc_TypeError, "add() takes one optional argument: n");
            return NULL;
        }
        int overflow;
        n = PyLong_AsLongLongAndOverflow(args[0], &overflow);
        if (overflow) {
            PyErr_SetString(PyExc_OverflowError,
                            "add(): n must fit in a signed 64-bit integer");
            return NULL;
        }
        if (n == -1 && PyErr_Occurred())
            return NULL;
    }
    if (__builtin_expect(counter_add(&self->slots, n) != 0, 0)) {
        PyErr_Format(PyExc_OverflowError,
                     "add(%lld): the counter's value would pass the signed 64-bit "
                     "range; nothing was added", n);
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *rseq_counter_value(CounterObject *self, PyObject *Py_UNUSED(unused))
{
    return rseq_int128_to_pylong(counter_value(&self->slots));
}

PyObject *rseq_counter_reset(CounterObject *self, PyObject *Py_UNUSED(unused))
{
    return rseq_int128_to_pylong(counter_reset(&self->slots));
}

PyObject *rseq_counter_per_cpu(CounterObject *self, PyObject *Py_UNUSED(unused))
{
    PyObject *list = PyList_New(self->slots.nslots);
    if (!list)
        return NULL;
    for (uint32_t cpu = 0; cpu < self->slots.nslots; cpu++) {
        PyObject *v = PyLong_FromLongLong(
            __atomic_load_n(counter_slot(&self->slots, cpu), __ATOMIC_RELAXED));
        if (!v) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, cpu, v);
    }
    return list;
}

PyObject *rseq_counter_fallback_count(CounterObject *self, PyObject *Py_UNUSED(unused))
{
    return PyLong_FromLongLong(__atomic_load_n(self->slots.fallback, __ATOMIC_RELAXED));
}

PyObject *rseq_counter_removed(CounterObject *self, PyObject *Py_UNUSED(unused))
{
    return rseq_int128_to_pylong(counter_baseline(&self->slots));
}

PyObject *rseq_counter_get_index(CounterObject *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromString(self->slots.mode == RSEQ_INDEX_MM_CID ? "mm_cid" : "cpu");
}

/* ------------------------------------------------------------------------
 * rseq.PerCpuCounter
 * ------------------------------------------------------------------------ */

static PyObject *percpu_counter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"index", NULL};
    const char *index = "cpu";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|s:PerCpuCounter", kwlist, &index))
        return NULL;
    enum rseq_index_mode mode;
    if (strcmp(index, "cpu") == 0) {
        mode = RSEQ_INDEX_CPU_ID;
    } else if (strcmp(index, "mm_cid") == 0) {
        mode = RSEQ_INDEX_MM_CID;
        if (counter_thread_area_size() < RSEQ_END_MM_CID) {
            rseq_module_state *st = PyType_GetModuleState(type);
            PyErr_SetString(st->Unsupported,
                            "PerCpuCounter(index='mm_cid'): mm_cid is not usable in this "
                            "process (see rseq.info().fields; under glibc's registration "
                            "set GLIBC_TUNABLES=glibc.pthread.rseq=0)");
            return NULL;
        }
    } else {
        PyErr_Format(PyExc_ValueError,
                     "PerCpuCounter(index=%R): index must be 'cpu' or 'mm_cid'",
                     PyTuple_Size(args) ? PyTuple_GET_ITEM(args, 0)
                                        : PyDict_GetItemString(kwds, "index"));
        return NULL;
    }
    CounterObject *self = (CounterObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    if (pool_take(&self->slots, &self->pool_index, mode) < 0) {
        self->slots.regions = NULL;
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void percpu_counter_dealloc(CounterObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    if (self->slots.regions)
        pool_give_back(&self->slots, self->pool_index);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyObject *percpu_counter_repr(CounterObject *self)
{
    PyObject *value = rseq_counter_value(self, NULL);
    if (!value)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("<rseq.PerCpuCounter value=%S index='%s'>", value,
                                       self->slots.mode == RSEQ_INDEX_MM_CID ? "mm_cid" : "cpu");
    Py_DECREF(value);
    return r;
}

PyDoc_STRVAR(percpu_counter_doc,
"PerCpuCounter(index='cpu')\n--\n\n"
"An exact counter with one slot per CPU, updated by a restartable sequence:\n"
"add() is a plain load, add and store on the calling thread's CPU slot, with\n"
"no lock and no atomic instruction, yet exact under preemption, migration\n"
"and signals.  index='mm_cid' indexes by the per-process concurrency ID\n"
"instead (compact; needs a registration that covers mm_cid).  Threads\n"
"without rseq add atomically to a separate fallback lane, so the count\n"
"stays exact everywhere.");

PyMethodDef rseq_counter_methods[] = {
    {"add", (PyCFunction)(void (*)(void))rseq_counter_add, METH_FASTCALL | METH_KEYWORDS,
     "add($self, /, n=1)\n--\n\n"
     "Add n (a signed 64-bit integer, default 1) on the calling thread's CPU.\n"
     "OverflowError if n is out of range, or if the slot cannot take it and\n"
     "the counter's value would pass the signed 64-bit range."},
    {"value", (PyCFunction)rseq_counter_value, METH_NOARGS,
     "value($self, /)\n--\n\n"
     "The exact sum, as a Python int: every add() that returned before this\n"
     "call is counted."},
    {"per_cpu", (PyCFunction)rseq_counter_per_cpu, METH_NOARGS,
     "per_cpu($self, /)\n--\n\n"
     "The raw per-CPU slots, one per possible CPU (or concurrency ID): what\n"
     "was added on each since the counter was created.  value() ==\n"
     "sum(per_cpu()) + fallback_count() - removed()."},
    {"fallback_count", (PyCFunction)rseq_counter_fallback_count, METH_NOARGS,
     "fallback_count($self, /)\n--\n\n"
     "What threads without a usable rseq area added (atomically) to the\n"
     "fallback lane."},
    {"removed", (PyCFunction)rseq_counter_removed, METH_NOARGS,
     "removed($self, /)\n--\n\n"
     "The baseline: the total that reset() calls have removed so far, less\n"
     "the adds that their CPU's slot could not hold (a slot near the int64\n"
     "limit after a reset()): those are placed here instead."},
    {"reset", (PyCFunction)rseq_counter_reset, METH_NOARGS,
     "reset($self, /)\n--\n\n"
     "Set the value to zero and return what was removed.  Lock-free: an add()\n"
     "that runs concurrently is either in the returned amount or stays in\n"
     "the counter, never lost and never counted twice."},
    {NULL, NULL, 0, NULL},
};

PyGetSetDef rseq_counter_getset[] = {
    {"index", (getter)rseq_counter_get_index, NULL,
     "How slots are indexed: 'cpu' (cpu_id) or 'mm_cid'.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot percpu_counter_slots[] = {
    {Py_tp_new, percpu_counter_new},
    {Py_tp_dealloc, percpu_counter_dealloc},
    {Py_tp_repr, percpu_counter_repr},
    {Py_tp_methods, rseq_counter_methods},
    {Py_tp_getset, rseq_counter_getset},
    {Py_tp_doc, (void *)percpu_counter_doc},
    {0, NULL},
};

static PyType_Spec percpu_counter_spec = {
    .name = RSEQ_TYPE_NAME("PerCpuCounter"),
    .basicsize = sizeof(CounterObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = percpu_counter_slots,
};

int rseq_counter_add_types(PyObject *module)
{
    PyObject *type = PyType_FromModuleAndSpec(module, &percpu_counter_spec, NULL);
    if (!type)
        return -1;
    int ret = PyModule_AddObjectRef(module, "PerCpuCounter", type);
    Py_DECREF(type);
    return ret;
}
