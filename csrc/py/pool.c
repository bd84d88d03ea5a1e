/*
 * pool.c - the binding of rseq.Pool: _PoolMap (one process's view of a
 * mapped pool) and rseq.PoolBlock (an allocated block: its index and its
 * memory through the buffer protocol).
 *
 * The file, its header and its validation are Python's (src/rseq/_pool.py);
 * this file checks the layout against the mapping once more, then runs the
 * allocator of csrc/lib/pool.h, where the design and the crash-safety
 * argument are written down.  The exception classes come from Python (the
 * errors= argument), so the module state stays as it is.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <time.h>

#include "core.h"
#include "counter_type.h" /* RSEQ_TYPE_NAME */
#include "pool.h"
#include "thread_area.h"

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    int readonly;
    struct rseq_pool pool;
    uint64_t length;
    PyObject *PoolError, *ExhaustedError, *OwnershipError, *FormatError;
    PyObject *block_type;
} PoolMapObject;

typedef struct {
    PyObject_HEAD
    PoolMapObject *map;
    uint64_t index;
    int owned;          /* from alloc(): free() and `with` free it */
} PoolBlockObject;

/* ------------------------------------------------------------------------
 * Layout check
 * ------------------------------------------------------------------------ */

static int layout_error(PoolMapObject *m, const char *why)
{
    PyErr_Format(m->FormatError, "pool layout: %s", why);
    return -1;
}

static int region_ok(uint64_t offset, uint64_t count, uint64_t size, uint64_t length)
{
    uint64_t bytes, end;
    return !__builtin_mul_overflow(count, size, &bytes)
           && !__builtin_add_overflow(offset, bytes, &end) && end <= length;
}

static int check_layout(PoolMapObject *m, uint64_t control_offset, uint64_t stacks_offset,
                        uint64_t owners_offset, uint64_t bitmap_offset, uint64_t blocks_offset)
{
    struct rseq_pool *p = &m->pool;
    if (p->block_count == 0 || p->block_count > (1ULL << 32))
        return layout_error(m, "block count out of range");
    if (p->block_size == 0 || p->block_size % RSEQ_POOL_BLOCK_ALIGN)
        return layout_error(m, "block size must be a positive multiple of 64");
    if (p->ncpu == 0 || p->cache == 0 || p->cache > RSEQ_POOL_MAX_CACHE
        || p->batch == 0 || p->batch > RSEQ_POOL_MAX_BATCH || p->batch > p->cache)
        return layout_error(m, "CPU count, cache or batch out of range");
    if (p->stack_size < RSEQ_POOL_STACK_HEAD + 8ULL * p->cache || p->stack_size % 64)
        return layout_error(m, "a CPU stack cannot hold its cache");
    if ((control_offset | stacks_offset | owners_offset | bitmap_offset | blocks_offset) % 64
        || ((uintptr_t)m->view.buf) % 64)
        return layout_error(m, "offsets must be 64-byte aligned");
    if (!region_ok(control_offset, 1, sizeof(struct rseq_pool_control), stacks_offset)
        || !region_ok(stacks_offset, p->ncpu, p->stack_size, owners_offset)
        || !region_ok(owners_offset, p->block_count, 8, bitmap_offset)
        || !region_ok(bitmap_offset, p->bitmap_words, 8, blocks_offset)
        || !region_ok(blocks_offset, p->block_count, p->block_size, m->length))
        return layout_error(m, "regions overlap or pass the end of the mapping");
    return 0;
}

static PyObject *pool_map_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "block_size", "block_count", "ncpu", "cache", "batch",
                             "control_offset", "stacks_offset", "stack_size", "owners_offset",
                             "bitmap_offset", "blocks_offset", "errors", "block_type",
                             "readonly", NULL};
    PyObject *buffer, *errors, *block_type;
    unsigned long long block_size, block_count, control_offset, stacks_offset, stack_size,
        owners_offset, bitmap_offset, blocks_offset;
    unsigned int ncpu, cache, batch;
    int readonly = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKKIIIKKKKKKO!O|p:_PoolMap", kwlist, &buffer,
                                     &block_size, &block_count, &ncpu, &cache, &batch,
                                     &control_offset, &stacks_offset, &stack_size,
                                     &owners_offset, &bitmap_offset, &blocks_offset,
                                     &PyTuple_Type, &errors, &block_type, &readonly))
        return NULL;
    if (PyTuple_GET_SIZE(errors) != 4) {
        PyErr_SetString(PyExc_TypeError, "errors: (PoolError, exhausted, ownership, format)");
        return NULL;
    }
    PoolMapObject *m = (PoolMapObject *)type->tp_alloc(type, 0);
    if (!m)
        return NULL;
    m->PoolError = Py_NewRef(PyTuple_GET_ITEM(errors, 0));
    m->ExhaustedError = Py_NewRef(PyTuple_GET_ITEM(errors, 1));
    m->OwnershipError = Py_NewRef(PyTuple_GET_ITEM(errors, 2));
    m->FormatError = Py_NewRef(PyTuple_GET_ITEM(errors, 3));
    m->block_type = Py_NewRef(block_type);
    m->readonly = readonly;
    if (PyObject_GetBuffer(buffer, &m->view,
                           readonly ? PyBUF_SIMPLE : PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    m->have_view = 1;
    m->length = (uint64_t)m->view.len;
    struct rseq_pool *p = &m->pool;
    p->base = m->view.buf;
    p->block_size = block_size;
    p->block_count = block_count;
    p->ncpu = ncpu;
    p->cache = cache;
    p->batch = batch;
    p->stack_size = stack_size;
    p->bitmap_words = (block_count + 63) / 64;
    if (check_layout(m, control_offset, stacks_offset, owners_offset, bitmap_offset,
                     blocks_offset) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    p->control = (struct rseq_pool_control *)(p->base + control_offset);
    p->stacks = p->base + stacks_offset;
    p->owners = (uint64_t *)(p->base + owners_offset);
    p->bitmap = (uint64_t *)(p->base + bitmap_offset);
    p->blocks = p->base + blocks_offset;
    return (PyObject *)m;
}

static int pool_map_traverse(PoolMapObject *m, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(m));
    Py_VISIT(m->PoolError);
    Py_VISIT(m->ExhaustedError);
    Py_VISIT(m->OwnershipError);
    Py_VISIT(m->FormatError);
    Py_VISIT(m->block_type);
    return 0;
}

static int pool_map_clear(PoolMapObject *m)
{
    Py_CLEAR(m->PoolError);
    Py_CLEAR(m->ExhaustedError);
    Py_CLEAR(m->OwnershipError);
    Py_CLEAR(m->FormatError);
    Py_CLEAR(m->block_type);
    return 0;
}

static void pool_map_dealloc(PoolMapObject *m)
{
    PyTypeObject *type = Py_TYPE(m);
    PyObject_GC_UnTrack(m);
    pool_map_clear(m);
    if (m->have_view)
        PyBuffer_Release(&m->view);
    type->tp_free((PyObject *)m);
    Py_DECREF(type);
}

/* ------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------ */

static PyObject *refuse_readonly(PoolMapObject *m, const char *what)
{
    PyErr_Format(m->PoolError, "%s(): the pool is open read-only", what);
    return NULL;
}

static PyObject *owner_text(uint64_t owner)
{
    if (owner == RSEQ_POOL_FREE)
        return PyUnicode_FromString("it is free");
    return PyUnicode_FromFormat("%s process %u (started at clock tick %llu)",
                                owner & RSEQ_POOL_ON_STACK ? "it was freed by"
                                : owner & RSEQ_POOL_POPPING ? "it is being taken by"
                                                            : "it is owned by",
                                rseq_pool_identity_pid(owner),
                                rseq_pool_identity_start(owner));
}

/* Raise for a negative result of pool.h; always NULL. */
static PyObject *pool_error(PoolMapObject *m, int64_t ret, uint64_t index, uint64_t owner,
                            const char *what)
{
    PyObject *text;
    switch (ret) {
    case RSEQ_POOL_EMPTY:
        PyErr_Format(m->ExhaustedError, "the pool is exhausted: all %llu blocks are owned "
                     "by live processes", (unsigned long long)m->pool.block_count);
        break;
    case RSEQ_POOL_E_RANGE:
        PyErr_Format(PyExc_IndexError, "%s(): block %llu out of range (the pool has %llu)",
                     what, (unsigned long long)index,
                     (unsigned long long)m->pool.block_count);
        break;
    case RSEQ_POOL_E_FREED:
        text = owner_text(owner);
        if (text) {
            PyErr_Format(m->OwnershipError, "%s(): block %llu is not allocated (double "
                         "free?): %U", what, (unsigned long long)index, text);
            Py_DECREF(text);
        }
        break;
    case RSEQ_POOL_E_NOT_OWNER:
        text = owner_text(owner);
        if (text) {
            PyErr_Format(m->OwnershipError, "%s(): block %llu is not this process's: %U",
                         what, (unsigned long long)index, text);
            Py_DECREF(text);
        }
        break;
    case RSEQ_POOL_E_DAMAGED:
        PyErr_Format(m->FormatError, "pool is corrupt: a CPU stack holds a count or a block "
                     "index out of range");
        break;
    case RSEQ_POOL_E_TARGET:
        PyErr_Format(m->PoolError, "give(): no live process %llu",
                     (unsigned long long)owner);
        break;
    default:
        PyErr_Format(PyExc_SystemError, "pool: unexpected result %lld", (long long)ret);
    }
    return NULL;
}

static int index_argument(PyObject *arg, uint64_t *index)
{
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "a block index must be an int, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return -1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *index = overflow || v < 0 ? UINT64_MAX : (uint64_t)v;
    return 0;
}

/* ------------------------------------------------------------------------
 * Allocation
 * ------------------------------------------------------------------------ */

/* The calling thread's area; a registration lost behind our back moves the
 * thread to the fallback (recorded in info().fallback), as counter.h does,
 * and the pool then uses the overflow only. */
static inline struct rseq_abi *pool_area(void)
{
    struct rseq_abi *rs = counter_thread_area();
    if (__builtin_expect(rs != NULL && rseq_area_lost(rs), 0)) {
        counter_thread_area_recheck();
        rs = counter_thread_area();
    }
    return rs;
}

static int64_t alloc_or_reclaim(PoolMapObject *m)
{
    uint64_t me = rseq_pool_self();
    int64_t i = rseq_pool_alloc(&m->pool, pool_area(), me);
    if (__builtin_expect(i >= 0, 1) || i != RSEQ_POOL_EMPTY)
        return i;
    /* Nothing found: give back the blocks of dead owners (and hidden free
     * ones), then try once more before calling the pool exhausted. */
    struct rseq_pool_census census;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = rseq_pool_census(&m->pool, 1, &census);
    Py_END_ALLOW_THREADS
    if (ret < 0) {
        PyErr_NoMemory();
        return -100;
    }
    return rseq_pool_alloc(&m->pool, pool_area(), me);
}

/* alloc_index() and alloc() take no argument but are METH_FASTCALL: CPython
 * 3.11 calls a bound METH_FASTCALL builtin straight from the interpreter
 * (PRECALL_BUILTIN_FAST), while METH_NOARGS goes through the generic
 * vectorcall path, a few ns more on a call that does about 5 ns of work. */
static int no_arguments(Py_ssize_t nargs, const char *name)
{
    if (__builtin_expect(nargs == 0, 1))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes no arguments (%zd given)", name, nargs);
    return -1;
}

static PyObject *pool_map_alloc_index(PoolMapObject *m, PyObject *const *Py_UNUSED(args),
                                      Py_ssize_t nargs)
{
    if (no_arguments(nargs, "alloc_index") < 0)
        return NULL;
    if (__builtin_expect(m->readonly, 0))
        return refuse_readonly(m, "alloc_index");
    int64_t i = alloc_or_reclaim(m);
    if (__builtin_expect(i >= 0, 1))
        return PyLong_FromLongLong(i);
    if (i == -100)
        return NULL;
    return pool_error(m, i, 0, 0, "alloc");
}

static PyObject *new_block(PoolMapObject *m, uint64_t index, int owned)
{
    PoolBlockObject *b = PyObject_New(PoolBlockObject, (PyTypeObject *)m->block_type);
    if (!b)
        return NULL;
    b->map = (PoolMapObject *)Py_NewRef((PyObject *)m);
    b->index = index;
    b->owned = owned;
    return (PyObject *)b;
}

static PyObject *pool_map_alloc(PoolMapObject *m, PyObject *const *Py_UNUSED(args),
                                Py_ssize_t nargs)
{
    if (no_arguments(nargs, "alloc") < 0)
        return NULL;
    if (__builtin_expect(m->readonly, 0))
        return refuse_readonly(m, "alloc");
    int64_t i = alloc_or_reclaim(m);
    if (__builtin_expect(i < 0, 0)) {
        if (i == -100)
            return NULL;
        return pool_error(m, i, 0, 0, "alloc");
    }
    PyObject *b = new_block(m, (uint64_t)i, 1);
    if (!b) {
        uint64_t owner;
        rseq_pool_free(&m->pool, pool_area(), rseq_pool_self(), (uint64_t)i, &owner);
    }
    return b;
}

static PyObject *free_index(PoolMapObject *m, uint64_t index)
{
    uint64_t owner = 0;
    int ret = rseq_pool_free(&m->pool, pool_area(), rseq_pool_self(), index, &owner);
    if (__builtin_expect(ret == 0, 1))
        Py_RETURN_NONE;
    return pool_error(m, ret, index, owner, "free");
}

static PyObject *pool_map_free(PoolMapObject *m, PyObject *arg)
{
    uint64_t index;
    if (__builtin_expect(m->readonly, 0))
        return refuse_readonly(m, "free");
    if (PyLong_CheckExact(arg)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
        index = overflow || v < 0 ? UINT64_MAX : (uint64_t)v;
    } else if (Py_IS_TYPE(arg, (PyTypeObject *)m->block_type)) {
        PoolBlockObject *b = (PoolBlockObject *)arg;
        if (b->map->pool.base != m->pool.base) {
            PyErr_SetString(PyExc_ValueError, "free(): the block belongs to another pool "
                            "mapping");
            return NULL;
        }
        index = b->index;
    } else if (index_argument(arg, &index) < 0) {
        return NULL;
    }
    return free_index(m, index);
}

static PyObject *pool_map_view(PoolMapObject *m, PyObject *arg)
{
    uint64_t index;
    if (index_argument(arg, &index) < 0)
        return NULL;
    if (index >= m->pool.block_count)
        return pool_error(m, RSEQ_POOL_E_RANGE, index, 0, "view");
    PyObject *b = new_block(m, index, 0);
    if (!b)
        return NULL;
    PyObject *view = PyMemoryView_FromObject(b);
    Py_DECREF(b);
    return view;
}

static PyObject *pool_map_block(PoolMapObject *m, PyObject *arg)
{
    uint64_t index;
    if (index_argument(arg, &index) < 0)
        return NULL;
    if (index >= m->pool.block_count)
        return pool_error(m, RSEQ_POOL_E_RANGE, index, 0, "block");
    return new_block(m, index, 0);
}

static PyObject *pool_map_give(PoolMapObject *m, PyObject *args)
{
    PyObject *arg;
    unsigned int pid;
    unsigned long long start;
    if (!PyArg_ParseTuple(args, "OIK:give", &arg, &pid, &start))
        return NULL;
    if (m->readonly)
        return refuse_readonly(m, "give");
    uint64_t index, owner = 0;
    if (Py_IS_TYPE(arg, (PyTypeObject *)m->block_type))
        index = ((PoolBlockObject *)arg)->index;
    else if (index_argument(arg, &index) < 0)
        return NULL;
    if (pid == 0 || pid > RSEQ_POOL_PID_MASK)
        return pool_error(m, RSEQ_POOL_E_TARGET, index, pid, "give");
    int ret = rseq_pool_give(&m->pool, rseq_pool_self(), index,
                             rseq_pool_identity(pid, start), &owner);
    if (ret < 0)
        return pool_error(m, ret, index, owner, "give");
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------
 * Looking at the pool
 * ------------------------------------------------------------------------ */

static PyObject *pool_map_census(PoolMapObject *m, PyObject *arg)
{
    int reclaim = PyObject_IsTrue(arg);
    if (reclaim < 0)
        return NULL;
    if (reclaim && m->readonly)
        return refuse_readonly(m, "reclaim");
    struct rseq_pool_census c;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = rseq_pool_census(&m->pool, reclaim, &c);
    Py_END_ALLOW_THREADS
    if (ret < 0)
        return PyErr_NoMemory();
    return Py_BuildValue("{sKsKsKsKsKsKsK}", "on_stacks", c.on_stacks,
                         "in_overflow", c.in_overflow, "live_owned", c.live_owned,
                         "dead_owned", c.dead_owned, "reclaimed", c.reclaimed,
                         "hints_repaired", c.hints_repaired, "damaged", c.damaged);
}

static PyObject *pool_map_stack_counts(PoolMapObject *m, PyObject *Py_UNUSED(unused))
{
    PyObject *list = PyList_New(m->pool.ncpu);
    for (uint32_t c = 0; list && c < m->pool.ncpu; c++) {
        uint64_t w = (uint64_t)__atomic_load_n(rseq_pool_word(&m->pool, c), __ATOMIC_RELAXED);
        PyObject *n = PyLong_FromUnsignedLongLong(rseq_pool_count_of(w));
        if (!n) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, c, n);
    }
    return list;
}

/* (pid, start, freed mark) of block i's owner word: (0, 0, False) in the
 * overflow.  For stats(), the tests and the stress harness. */
static PyObject *pool_map_owner(PoolMapObject *m, PyObject *arg)
{
    uint64_t index;
    if (index_argument(arg, &index) < 0)
        return NULL;
    if (index >= m->pool.block_count)
        return pool_error(m, RSEQ_POOL_E_RANGE, index, 0, "owner");
    uint64_t o = __atomic_load_n(&m->pool.owners[index], __ATOMIC_ACQUIRE);
    return Py_BuildValue("(IKO)", rseq_pool_identity_pid(o), rseq_pool_identity_start(o),
                         o & RSEQ_POOL_FLAGS ? Py_True : Py_False);
}

/* Every owner word as (pid, start) with the free mark, and the indexes on
 * each CPU stack: the raw material of stats(). */
static PyObject *pool_map_owners(PoolMapObject *m, PyObject *Py_UNUSED(unused))
{
    PyObject *counts = PyDict_New();
    if (!counts)
        return NULL;
    for (uint64_t i = 0; i < m->pool.block_count; i++) {
        uint64_t o = __atomic_load_n(&m->pool.owners[i], __ATOMIC_RELAXED);
        if (o == RSEQ_POOL_FREE || (o & RSEQ_POOL_FLAGS))
            continue;
        PyObject *key = Py_BuildValue("(IK)", rseq_pool_identity_pid(o),
                                      rseq_pool_identity_start(o));
        if (!key)
            goto fail;
        PyObject *old = PyDict_GetItemWithError(counts, key);
        long n = old ? PyLong_AsLong(old) : 0;
        PyObject *value = PyLong_FromLong(n + 1);
        int ret = value ? PyDict_SetItem(counts, key, value) : -1;
        Py_DECREF(key);
        Py_XDECREF(value);
        if (ret < 0)
            goto fail;
    }
    return counts;
fail:
    Py_DECREF(counts);
    return NULL;
}

/* Set every hint bit of a new pool (all blocks start in the overflow). */
static PyObject *pool_map_initialise(PoolMapObject *m, PyObject *Py_UNUSED(unused))
{
    if (m->readonly)
        return refuse_readonly(m, "initialise");
    for (uint64_t i = 0; i < m->pool.block_count; i++)
        rseq_pool_hint(&m->pool, i);
    Py_RETURN_NONE;
}

static PyObject *pool_map_identity(PoolMapObject *Py_UNUSED(m), PyObject *Py_UNUSED(unused))
{
    uint64_t me = rseq_pool_self();
    return Py_BuildValue("(IK)", rseq_pool_identity_pid(me), rseq_pool_identity_start(me));
}

/* ns per alloc + free pair in C, GIL released, from the calling thread:
 * kind 'pool' (this pool, by index) or 'malloc' (malloc/free of a block's
 * size, the reference).  For `python -m rseq bench --section pool`. */
static double bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static PyObject *pool_map_bench_pairs(PoolMapObject *m, PyObject *args)
{
    const char *kind;
    long iterations;
    if (!PyArg_ParseTuple(args, "sl:_bench_pairs", &kind, &iterations))
        return NULL;
    int use_pool = strcmp(kind, "pool") == 0;
    if ((!use_pool && strcmp(kind, "malloc") != 0) || iterations < 1) {
        PyErr_SetString(PyExc_ValueError, "kind 'pool' or 'malloc', iterations > 0");
        return NULL;
    }
    if (m->readonly)
        return refuse_readonly(m, "_bench_pairs");
    long failures = 0;
    double t0, t1;
    size_t size = (size_t)m->pool.block_size;
    Py_BEGIN_ALLOW_THREADS
    struct rseq_abi *rs = pool_area();
    uint64_t me = rseq_pool_self(), owner;
    t0 = bench_now_ns();
    if (use_pool) {
        for (long i = 0; i < iterations; i++) {
            int64_t index = rseq_pool_alloc(&m->pool, rs, me);
            if (index < 0 || rseq_pool_free(&m->pool, rs, me, (uint64_t)index, &owner) != 0)
                failures++;
        }
    } else {
        for (long i = 0; i < iterations; i++) {
            char *p = malloc(size);
            if (!p)
                failures++;
            else
                *(volatile char *)p = 1;
            free(p);
        }
    }
    t1 = bench_now_ns();
    Py_END_ALLOW_THREADS
    if (failures) {
        PyErr_Format(PyExc_RuntimeError, "_bench_pairs: %ld of %ld pairs failed", failures,
                     iterations);
        return NULL;
    }
    return PyFloat_FromDouble((t1 - t0) / (double)iterations);
}

static PyMethodDef pool_map_methods[] = {
    {"_bench_pairs", (PyCFunction)pool_map_bench_pairs, METH_VARARGS,
     "_bench_pairs($self, kind, iterations, /)\n--\n\n"
     "ns per alloc + free pair in C ('pool' or 'malloc'), GIL released."},
    {"alloc_index", (PyCFunction)(void (*)(void))pool_map_alloc_index, METH_FASTCALL,
     "alloc_index($self, /)\n--\n\nAllocate a block; its index."},
    {"alloc", (PyCFunction)(void (*)(void))pool_map_alloc, METH_FASTCALL,
     "alloc($self, /)\n--\n\nAllocate a block; a PoolBlock."},
    {"free", (PyCFunction)pool_map_free, METH_O,
     "free($self, block, /)\n--\n\nFree a block (PoolBlock or index) this process owns."},
    {"view", (PyCFunction)pool_map_view, METH_O,
     "view($self, index, /)\n--\n\nA writable memoryview of block `index`."},
    {"block", (PyCFunction)pool_map_block, METH_O,
     "block($self, index, /)\n--\n\nA PoolBlock for `index` that frees nothing."},
    {"give", (PyCFunction)pool_map_give, METH_VARARGS,
     "give($self, index, pid, start, /)\n--\n\nHand a block to process (pid, start)."},
    {"census", (PyCFunction)pool_map_census, METH_O,
     "census($self, reclaim, /)\n--\n\nCounts of the pool; reclaim dead owners' blocks."},
    {"stack_counts", (PyCFunction)pool_map_stack_counts, METH_NOARGS,
     "stack_counts($self, /)\n--\n\nFree blocks cached on each CPU's stack."},
    {"owner", (PyCFunction)pool_map_owner, METH_O,
     "owner($self, index, /)\n--\n\n(pid, start, freed mark) of a block's owner word."},
    {"owners", (PyCFunction)pool_map_owners, METH_NOARGS,
     "owners($self, /)\n--\n\n{(pid, start): blocks} of the owner words (not freed)."},
    {"initialise", (PyCFunction)pool_map_initialise, METH_NOARGS,
     "initialise($self, /)\n--\n\nPut every block in the overflow (a new pool)."},
    {"identity", (PyCFunction)pool_map_identity, METH_NOARGS,
     "identity($self, /)\n--\n\n(pid, start) this process records as owner."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot pool_map_slots[] = {
    {Py_tp_new, pool_map_new},
    {Py_tp_dealloc, pool_map_dealloc},
    {Py_tp_traverse, pool_map_traverse},
    {Py_tp_clear, pool_map_clear},
    {Py_tp_methods, pool_map_methods},
    {Py_tp_doc, (void *)"The mapped, validated layout of a pool (internal: use rseq.Pool)."},
    {0, NULL},
};

static PyType_Spec pool_map_spec = {
    .name = RSEQ_TYPE_NAME("_PoolMap"),
    .basicsize = sizeof(PoolMapObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = pool_map_slots,
};

/* ------------------------------------------------------------------------
 * rseq.PoolBlock
 * ------------------------------------------------------------------------ */

static void pool_block_dealloc(PoolBlockObject *b)
{
    PyTypeObject *type = Py_TYPE(b);
    Py_XDECREF(b->map);
    PyObject_Free(b);
    Py_DECREF(type);
}

static int pool_block_getbuffer(PoolBlockObject *b, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)b, rseq_pool_block(&b->map->pool, b->index),
                             (Py_ssize_t)b->map->pool.block_size, b->map->readonly, flags);
}

static PyObject *pool_block_get_index(PoolBlockObject *b, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(b->index);
}

static PyObject *pool_block_get_view(PoolBlockObject *b, void *Py_UNUSED(closure))
{
    return PyMemoryView_FromObject((PyObject *)b);
}

static PyObject *pool_block_free(PoolBlockObject *b, PyObject *Py_UNUSED(unused))
{
    if (b->map->readonly)
        return refuse_readonly(b->map, "free");
    return free_index(b->map, b->index);
}

static PyObject *pool_block_enter(PoolBlockObject *b, PyObject *Py_UNUSED(unused))
{
    return PyMemoryView_FromObject((PyObject *)b);
}

static PyObject *pool_block_exit(PoolBlockObject *b, PyObject *const *Py_UNUSED(args),
                                 Py_ssize_t Py_UNUSED(nargs))
{
    return pool_block_free(b, NULL);
}

static PyObject *pool_block_repr(PoolBlockObject *b)
{
    return PyUnicode_FromFormat("<rseq.PoolBlock index=%llu size=%llu>",
                                (unsigned long long)b->index,
                                (unsigned long long)b->map->pool.block_size);
}

static PyMethodDef pool_block_methods[] = {
    {"free", (PyCFunction)pool_block_free, METH_NOARGS,
     "free($self, /)\n--\n\nReturn the block to its pool (this process must own it)."},
    {"__enter__", (PyCFunction)pool_block_enter, METH_NOARGS,
     "__enter__($self, /)\n--\n\nThe block's memoryview."},
    {"__exit__", (PyCFunction)(void (*)(void))pool_block_exit, METH_FASTCALL,
     "__exit__($self, *exc, /)\n--\n\nFree the block."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_block_getset[] = {
    {"index", (getter)pool_block_get_index, NULL,
     "The block's index in its pool: what other processes use to find it.", NULL},
    {"view", (getter)pool_block_get_view, NULL,
     "A new writable memoryview of the block (no copy).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(pool_block_doc,
"A block of an rseq.Pool: `index` names it in every process, the buffer\n"
"protocol gives its memory without a copy (memoryview(block), block.view,\n"
"numpy.frombuffer(block)).  `with pool.alloc() as mv:` frees it on exit.");

static PyType_Slot pool_block_slots[] = {
    {Py_tp_dealloc, pool_block_dealloc},
    {Py_tp_repr, pool_block_repr},
    {Py_tp_methods, pool_block_methods},
    {Py_tp_getset, pool_block_getset},
    {Py_tp_doc, (void *)pool_block_doc},
    {Py_bf_getbuffer, pool_block_getbuffer},
    {0, NULL},
};

static PyType_Spec pool_block_spec = {
    .name = RSEQ_TYPE_NAME("PoolBlock"),
    .basicsize = sizeof(PoolBlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = pool_block_slots,
};

/* ------------------------------------------------------------------------
 * C API: alloc and free by index
 * ------------------------------------------------------------------------ */

/* The _PoolMap type of this module (rseq._core's for the capsule). */
static PyObject *pool_map_type_ref;

struct rseq_capi_pool *rseq_capi_pool_of(PyObject *obj)
{
    if (!pool_map_type_ref || !PyObject_TypeCheck(obj, (PyTypeObject *)pool_map_type_ref)) {
        PyErr_SetString(PyExc_TypeError, "pool_of() takes the _PoolMap of an rseq.Pool "
                        "(pool._map)");
        return NULL;
    }
    if (((PoolMapObject *)obj)->readonly) {
        PyErr_SetString(PyExc_ValueError, "pool_of(): the pool is open read-only");
        return NULL;
    }
    return (struct rseq_capi_pool *)&((PoolMapObject *)obj)->pool;
}

int64_t rseq_capi_pool_alloc(struct rseq_capi_pool *handle)
{
    struct rseq_pool *p = (struct rseq_pool *)handle;
    uint64_t me = rseq_pool_self();
    int64_t i = rseq_pool_alloc(p, pool_area(), me);
    if (i != RSEQ_POOL_EMPTY)
        return i;
    struct rseq_pool_census census;
    if (rseq_pool_census(p, 1, &census) < 0)
        return RSEQ_POOL_EMPTY;
    return rseq_pool_alloc(p, pool_area(), me);
}

int rseq_capi_pool_free(struct rseq_capi_pool *handle, uint64_t index)
{
    uint64_t owner;
    return rseq_pool_free((struct rseq_pool *)handle, pool_area(), rseq_pool_self(),
                          index, &owner);
}

void *rseq_capi_pool_block(struct rseq_capi_pool *handle, uint64_t index)
{
    struct rseq_pool *p = (struct rseq_pool *)handle;
    return index < p->block_count ? rseq_pool_block(p, index) : NULL;
}

uint64_t rseq_capi_pool_block_size(struct rseq_capi_pool *handle)
{
    return ((struct rseq_pool *)handle)->block_size;
}

uint64_t rseq_capi_pool_block_count(struct rseq_capi_pool *handle)
{
    return ((struct rseq_pool *)handle)->block_count;
}

int rseq_pool_add_types(PyObject *module)
{
    PyObject *map = PyType_FromModuleAndSpec(module, &pool_map_spec, NULL);
    if (!map)
        return -1;
    int ret = PyModule_AddObjectRef(module, "_PoolMap", map);
    if (ret < 0) {
        Py_DECREF(map);
        return -1;
    }
    Py_XSETREF(pool_map_type_ref, map); /* kept for the capsule's pool_of() */
    PyObject *block = PyType_FromModuleAndSpec(module, &pool_block_spec, NULL);
    if (!block)
        return -1;
    ret = PyModule_AddObjectRef(module, "PoolBlock", block);
    Py_DECREF(block);
    return ret;
}
