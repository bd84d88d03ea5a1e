/*
 * arena.c - the key table and counters of a shared-memory arena.
 *
 * The file, its header and its validation are handled in Python
 * (src/rseq/_arena.py); this file gets a writable buffer over the mapping and
 * the layout the header declared, checks the layout against the buffer once
 * more (no offset is trusted before it is checked), and implements what
 * needs atomics: finding and creating keys, and the counters.
 *
 * Layout (offsets from the start of the file):
 *   [0, table_offset)               header (written and validated in Python)
 *   table_offset + i * entry_size   entry i, for i < capacity
 *   regions_offset + c * region_size + i * 8
 *                                   counter i's slot for CPU c, c < ncpu
 *
 * Entry (entry_size bytes, 16-byte aligned):
 *   u64  state       0 empty; CLAIMED | hash30 | pid; READY | hash30
 *   u32  key_length
 *   u32  reserved
 *   i64  fallback    the counter's lane for writers without rseq
 *   i64  reserved
 *   i128 baseline    what reset() removed
 *   u8   key[key_max]
 *
 * Creating a key never takes a lock: a process claims an empty entry with a
 * compare-and-swap that records its pid, writes the key, and publishes the
 * entry by storing READY.  A process that finds an entry CLAIMED by a pid that
 * no longer exists (kill -9 in the middle of creation) takes the claim over
 * with another compare-and-swap; nobody else could have used the entry, as
 * only READY entries are used.  So concurrent creation of one key yields one
 * entry, and a creator killed at any instant leaves the arena usable.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <sched.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core.h"
#include "counter_type.h"

#define ENTRY_STATE 0
#define ENTRY_KEY_LENGTH 8
#define ENTRY_FALLBACK 16
#define ENTRY_BASELINE 32
#define ENTRY_KEY 48

#define STATE_TAG_SHIFT 62
#define STATE_EMPTY 0ULL
#define STATE_CLAIMED 1ULL
#define STATE_READY 2ULL
#define STATE_HASH_MASK ((1ULL << 30) - 1)

static inline uint64_t state_make(uint64_t tag, uint32_t hash30, uint32_t pid)
{
    return (tag << STATE_TAG_SHIFT) | ((uint64_t)hash30 << 32) | pid;
}
static inline uint64_t state_tag(uint64_t s) { return s >> STATE_TAG_SHIFT; }
static inline uint32_t state_hash(uint64_t s) { return (uint32_t)((s >> 32) & STATE_HASH_MASK); }
static inline uint32_t state_pid(uint64_t s) { return (uint32_t)s; }

static uint64_t fnv1a64(const char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    char *base;
    uint64_t length;
    uint64_t table_offset;
    uint32_t entry_size, key_max, capacity, ncpu;
    uint64_t regions_offset, region_size;
} ArenaMapObject;

static inline char *entry_at(ArenaMapObject *m, uint32_t i)
{
    return m->base + m->table_offset + (uint64_t)i * m->entry_size;
}

static inline uint64_t *entry_state(char *e) { return (uint64_t *)(e + ENTRY_STATE); }

static PyObject *format_error(ArenaMapObject *m, const char *fmt, ...)
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

/* ------------------------------------------------------------------------
 * Layout check
 * ------------------------------------------------------------------------ */

static int check_layout(ArenaMapObject *m)
{
    uint64_t table_bytes, regions_bytes, table_end, regions_end;
    if (m->capacity == 0 || m->ncpu == 0 || m->key_max == 0)
        return format_error(m, "arena layout: capacity, CPU count and key size must be positive"), -1;
    if (m->entry_size % 16 || m->entry_size < ENTRY_KEY + (uint64_t)m->key_max)
        return format_error(m, "arena layout: entry size %u cannot hold a %u-byte key",
                            m->entry_size, m->key_max), -1;
    if (m->table_offset % 64 || m->regions_offset % 64 || m->region_size % 64)
        return format_error(m, "arena layout: offsets must be 64-byte aligned"), -1;
    if (__builtin_mul_overflow((uint64_t)m->capacity, (uint64_t)m->entry_size, &table_bytes)
        || __builtin_add_overflow(m->table_offset, table_bytes, &table_end)
        || table_end > m->regions_offset)
        return format_error(m, "arena layout: the key table overlaps the counters"), -1;
    if (m->region_size < (uint64_t)m->capacity * 8)
        return format_error(m, "arena layout: a per-CPU region of %llu bytes cannot hold "
                            "%u counters", (unsigned long long)m->region_size, m->capacity), -1;
    if (__builtin_mul_overflow((uint64_t)m->ncpu, m->region_size, &regions_bytes)
        || __builtin_add_overflow(m->regions_offset, regions_bytes, &regions_end)
        || regions_end > m->length)
        return format_error(m, "arena layout: %llu bytes needed, the mapping has %llu",
                            (unsigned long long)regions_end,
                            (unsigned long long)m->length), -1;
    if (((uintptr_t)m->base) % 64)
        return format_error(m, "arena mapping is not 64-byte aligned"), -1;
    return 0;
}

static PyObject *arena_map_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "table_offset", "entry_size", "key_max", "capacity",
                             "regions_offset", "region_size", "ncpu", NULL};
    PyObject *buffer;
    unsigned long long table_offset, regions_offset, region_size;
    unsigned int entry_size, key_max, capacity, ncpu;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKIIIKKI:ArenaMap", kwlist, &buffer,
                                     &table_offset, &entry_size, &key_max, &capacity,
                                     &regions_offset, &region_size, &ncpu))
        return NULL;
    ArenaMapObject *m = (ArenaMapObject *)type->tp_alloc(type, 0);
    if (!m)
        return NULL;
    if (PyObject_GetBuffer(buffer, &m->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    m->have_view = 1;
    m->base = m->view.buf;
    m->length = (uint64_t)m->view.len;
    m->table_offset = table_offset;
    m->entry_size = entry_size;
    m->key_max = key_max;
    m->capacity = capacity;
    m->regions_offset = regions_offset;
    m->region_size = region_size;
    m->ncpu = ncpu;
    if (check_layout(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return (PyObject *)m;
}

static void arena_map_dealloc(ArenaMapObject *m)
{
    PyTypeObject *type = Py_TYPE(m);
    if (m->have_view)
        PyBuffer_Release(&m->view);
    type->tp_free((PyObject *)m);
    Py_DECREF(type);
}

/* ------------------------------------------------------------------------
 * Finding and creating keys
 * ------------------------------------------------------------------------ */

/* A claimant is gone when kill(pid, 0) says so.  (A recycled pid keeps the
 * claim alive until the waiter's timeout: reported, never corrupting.) */
static int pid_is_gone(uint32_t pid)
{
    return pid != 0 && kill((pid_t)pid, 0) != 0 && errno == ESRCH;
}

static void fill_entry(ArenaMapObject *m, char *e, uint64_t ready, const char *key,
                       uint32_t length)
{
    /* A stolen claim may have left a partial key and nothing else: no
     * counter slot can have been written, since only READY entries are
     * used. Zero what a dead claimant might have begun anyway. */
    memset(e + ENTRY_KEY, 0, m->key_max);
    memcpy(e + ENTRY_KEY, key, length);
    *(uint32_t *)(e + ENTRY_KEY_LENGTH) = length;
    *(int64_t *)(e + ENTRY_FALLBACK) = 0;
    *(__int128 *)(e + ENTRY_BASELINE) = 0;
    __atomic_store_n(entry_state(e), ready, __ATOMIC_RELEASE);
}

static double monotonic_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Index of `key`, creating it if asked; -1 (not found, not created);
 * -2 with an exception set. */
static long find_key(ArenaMapObject *m, const char *key, uint32_t length, int create,
                     double timeout)
{
    rseq_module_state *st = PyType_GetModuleState(Py_TYPE(m));
    uint64_t h = fnv1a64(key, length);
    uint32_t h30 = (uint32_t)(h >> 34);
    uint32_t pid = (uint32_t)getpid();
    uint32_t start = (uint32_t)(h % m->capacity);
    double deadline = 0;

    for (uint32_t probe = 0; probe < m->capacity; probe++) {
        uint32_t i = (start + probe) % m->capacity;
        char *e = entry_at(m, i);
        uint64_t *state = entry_state(e);
        for (;;) {
            uint64_t s = __atomic_load_n(state, __ATOMIC_ACQUIRE);
            uint64_t tag = state_tag(s);
            if (tag == STATE_EMPTY) {
                if (s != 0) {
                    format_error(m, "arena entry %u is corrupt (state %#llx)", i,
                                 (unsigned long long)s);
                    return -2;
                }
                if (!create)
                    return -1;
                uint64_t claim = state_make(STATE_CLAIMED, h30, pid);
                if (__atomic_compare_exchange_n(state, &s, claim, 0, __ATOMIC_ACQ_REL,
                                                __ATOMIC_ACQUIRE)) {
                    fill_entry(m, e, state_make(STATE_READY, h30, 0), key, length);
                    return i;
                }
                continue; /* someone claimed it first: look again */
            }
            if (tag != STATE_CLAIMED && tag != STATE_READY) {
                format_error(m, "arena entry %u is corrupt (state %#llx)", i,
                             (unsigned long long)s);
                return -2;
            }
            if (state_hash(s) != h30)
                break; /* another key: probe on */
            if (tag == STATE_READY) {
                uint32_t klen = *(volatile uint32_t *)(e + ENTRY_KEY_LENGTH);
                if (klen == 0 || klen > m->key_max) {
                    format_error(m, "arena entry %u is corrupt (key length %u, at most %u)",
                                 i, klen, m->key_max);
                    return -2;
                }
                if (klen == length && memcmp(e + ENTRY_KEY, key, length) == 0)
                    return i;
                break;
            }
            /* CLAIMED with our hash: the key may be ours; wait for it. */
            uint32_t owner = state_pid(s);
            if (pid_is_gone(owner)) {
                uint64_t claim = state_make(STATE_CLAIMED, h30, pid);
                if (__atomic_compare_exchange_n(state, &s, claim, 0, __ATOMIC_ACQ_REL,
                                                __ATOMIC_ACQUIRE)) {
                    fill_entry(m, e, state_make(STATE_READY, h30, 0), key, length);
                    return i;
                }
                continue;
            }
            double now = monotonic_seconds();
            if (deadline == 0)
                deadline = now + timeout;
            else if (now > deadline) {
                PyErr_Format(st->ArenaError,
                             "arena entry %u has been claimed by live process %u for more "
                             "than %.1f s (stopped? or a recycled pid)", i, owner, timeout);
                return -2;
            }
            Py_BEGIN_ALLOW_THREADS
            sched_yield();
            Py_END_ALLOW_THREADS
        }
    }
    if (!create)
        return -1;
    PyErr_Format(st->ArenaFullError, "the arena is full: all %u counters are in use",
                 m->capacity);
    return -2;
}

static int key_argument(PyObject *key, const char **data, Py_ssize_t *length)
{
    if (!PyBytes_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "key must be bytes (UTF-8 of the key)");
        return -1;
    }
    *data = PyBytes_AS_STRING(key);
    *length = PyBytes_GET_SIZE(key);
    return 0;
}

static PyObject *arena_map_find(ArenaMapObject *m, PyObject *args)
{
    PyObject *key;
    int create = 0;
    double timeout = 5.0;
    if (!PyArg_ParseTuple(args, "O|pd:find", &key, &create, &timeout))
        return NULL;
    const char *data;
    Py_ssize_t length;
    if (key_argument(key, &data, &length) < 0)
        return NULL;
    if (length == 0 || (uint64_t)length > m->key_max) {
        PyErr_Format(PyExc_ValueError, "key of %zd bytes: keys take 1 to %u bytes of UTF-8",
                     length, m->key_max);
        return NULL;
    }
    long i = find_key(m, data, (uint32_t)length, create, timeout);
    if (i == -2)
        return NULL;
    return PyLong_FromLong(i);
}

static PyObject *arena_map_keys(ArenaMapObject *m, PyObject *Py_UNUSED(unused))
{
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (uint32_t i = 0; i < m->capacity; i++) {
        char *e = entry_at(m, i);
        uint64_t s = __atomic_load_n(entry_state(e), __ATOMIC_ACQUIRE);
        if (state_tag(s) != STATE_READY)
            continue;
        uint32_t klen = *(volatile uint32_t *)(e + ENTRY_KEY_LENGTH);
        if (klen == 0 || klen > m->key_max) {
            Py_DECREF(list);
            return format_error(m, "arena entry %u is corrupt (key length %u, at most %u)",
                                i, klen, m->key_max);
        }
        PyObject *item = Py_BuildValue("(Iy#)", i, e + ENTRY_KEY, (Py_ssize_t)klen);
        if (!item || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

static PyObject *arena_map_entry_state(ArenaMapObject *m, PyObject *arg)
{
    unsigned long i = PyLong_AsUnsignedLong(arg);
    if (i == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (i >= m->capacity) {
        PyErr_Format(PyExc_IndexError, "entry %lu out of range (capacity %u)", i, m->capacity);
        return NULL;
    }
    uint64_t s = __atomic_load_n(entry_state(entry_at(m, (uint32_t)i)), __ATOMIC_ACQUIRE);
    static const char *names[] = {"empty", "claimed", "ready", "corrupt"};
    return Py_BuildValue("(sI)", names[state_tag(s)], state_pid(s));
}

/* ------------------------------------------------------------------------
 * rseq.ArenaCounter
 * ------------------------------------------------------------------------ */

static PyObject *arena_map_counter(ArenaMapObject *m, PyObject *args)
{
    unsigned int index;
    PyObject *key;
    if (!PyArg_ParseTuple(args, "IU:counter", &index, &key))
        return NULL;
    if (index >= m->capacity) {
        PyErr_Format(PyExc_IndexError, "counter %u out of range (capacity %u)", index,
                     m->capacity);
        return NULL;
    }
    char *e = entry_at(m, index);
    if (state_tag(__atomic_load_n(entry_state(e), __ATOMIC_ACQUIRE)) != STATE_READY) {
        PyErr_Format(PyExc_ValueError, "arena entry %u is not a published counter", index);
        return NULL;
    }
    rseq_module_state *st = PyType_GetModuleState(Py_TYPE(m));
    CounterObject *c = PyObject_New(CounterObject, (PyTypeObject *)st->ArenaCounter_type);
    if (!c)
        return NULL;
    c->slots.regions = m->base + m->regions_offset;
    c->slots.region_size = m->region_size;
    c->slots.nslots = m->ncpu;
    c->slots.index = index;
    c->slots.fallback = (int64_t *)(e + ENTRY_FALLBACK);
    c->slots.baseline = (__int128 *)(e + ENTRY_BASELINE);
    c->slots.mode = RSEQ_INDEX_CPU_ID; /* cpu_id is the index valid across processes */
    c->owner = Py_NewRef((PyObject *)m);
    c->key = Py_NewRef(key);
    c->pool_index = 0;
    return (PyObject *)c;
}

static void arena_counter_dealloc(CounterObject *c)
{
    PyTypeObject *type = Py_TYPE(c);
    Py_XDECREF(c->owner);
    Py_XDECREF(c->key);
    PyObject_Free(c);
    Py_DECREF(type);
}

static PyObject *arena_counter_repr(CounterObject *c)
{
    PyObject *value = rseq_counter_value(c, NULL);
    if (!value)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("<rseq.ArenaCounter key=%R value=%S>", c->key, value);
    Py_DECREF(value);
    return r;
}

static PyObject *arena_counter_get_key(CounterObject *c, void *Py_UNUSED(closure))
{
    return Py_NewRef(c->key);
}

static PyGetSetDef arena_counter_getset[] = {
    {"key", (getter)arena_counter_get_key, NULL, "The counter's key in its arena.", NULL},
    {"index", (getter)rseq_counter_get_index, NULL,
     "How slots are indexed: always 'cpu' in an arena (valid across processes).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(arena_counter_doc,
"A per-CPU counter stored in a shared-memory rseq.Arena: every process that\n"
"opens the arena sees and updates the same value.  Same methods as\n"
"rseq.PerCpuCounter; get one with arena.counter(key).");

static PyType_Slot arena_counter_slots[] = {
    {Py_tp_dealloc, arena_counter_dealloc},
    {Py_tp_repr, arena_counter_repr},
    {Py_tp_methods, rseq_counter_methods},
    {Py_tp_getset, arena_counter_getset},
    {Py_tp_doc, (void *)arena_counter_doc},
    {0, NULL},
};

static PyType_Spec arena_counter_spec = {
    .name = RSEQ_TYPE_NAME("ArenaCounter"),
    .basicsize = sizeof(CounterObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = arena_counter_slots,
};

/* ------------------------------------------------------------------------
 * _ArenaMap type
 * ------------------------------------------------------------------------ */

static PyMethodDef arena_map_methods[] = {
    {"find", (PyCFunction)arena_map_find, METH_VARARGS,
     "find($self, key, create=False, timeout=5.0, /)\n--\n\n"
     "Index of the counter with this key (bytes), -1 if absent and not created."},
    {"keys", (PyCFunction)arena_map_keys, METH_NOARGS,
     "keys($self, /)\n--\n\n[(index, key bytes)] of the published counters."},
    {"counter", (PyCFunction)arena_map_counter, METH_VARARGS,
     "counter($self, index, key, /)\n--\n\nThe ArenaCounter at a published index."},
    {"entry_state", (PyCFunction)arena_map_entry_state, METH_O,
     "entry_state($self, index, /)\n--\n\n(state name, claimant pid) of an entry."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot arena_map_slots[] = {
    {Py_tp_new, arena_map_new},
    {Py_tp_dealloc, arena_map_dealloc},
    {Py_tp_methods, arena_map_methods},
    {Py_tp_doc, (void *)"The mapped, validated layout of an arena (internal: use rseq.Arena)."},
    {0, NULL},
};

static PyType_Spec arena_map_spec = {
    .name = RSEQ_TYPE_NAME("_ArenaMap"),
    .basicsize = sizeof(ArenaMapObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = arena_map_slots,
};

int rseq_arena_add_types(PyObject *module)
{
    rseq_module_state *st = PyModule_GetState(module);
    PyObject *map = PyType_FromModuleAndSpec(module, &arena_map_spec, NULL);
    if (!map)
        return -1;
    int ret = PyModule_AddObjectRef(module, "_ArenaMap", map);
    Py_DECREF(map);
    if (ret < 0)
        return -1;
    st->ArenaCounter_type = PyType_FromModuleAndSpec(module, &arena_counter_spec, NULL);
    if (!st->ArenaCounter_type)
        return -1;
    if (PyModule_AddObjectRef(module, "ArenaCounter", st->ArenaCounter_type) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "ARENA_ENTRY_HEADER", ENTRY_KEY);
}
