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
 *   u64  state       0 empty;
 *                    READY:   tag 2 | hash30 << 32 (low 32 bits zero)
 *                    CLAIMED: tag 1 | hash16 << 46 | start24 << 22 | pid22
 *   u32  key_length
 *   u32  reserved
 *   i64  fallback    the counter's lane for writers without rseq
 *   i64  reserved
 *   i128 baseline    what reset() removed
 *   u8   key[key_max]
 *
 * Creating a key never takes a lock: a process claims an empty entry with a
 * compare-and-swap that records its identity (pid and the low 24 bits of its
 * start time, the rule of src/rseq/_procid.py), writes the key, and
 * publishes the entry by storing READY.  A process that finds an entry
 * CLAIMED by a process that no longer runs (kill -9 in the middle of
 * creation; or a recycled pid, whose start time differs) takes the claim
 * over with another compare-and-swap; nobody else could have used the entry,
 * as only READY entries are used.  So concurrent creation of one key yields
 * one entry, and a creator killed at any instant leaves the arena usable.
 * The identity fits in the state word so that claim and identity change in
 * one atomic store: pids fit in 22 bits (PID_MAX_LIMIT is 2^22 on 64-bit
 * Linux), start times are compared modulo 2^24 clock ticks (46 hours at
 * 100 Hz), and the claim keeps 16 bits of the hash (a match of those only
 * makes a creator wait for another key's short creation).
 *
 * Every READY entry that is read is checked: the unused bits of its state
 * are zero, its key length is in range and its stored hash is the hash of
 * its key.  A damaged entry raises ArenaFormatError naming it wherever it
 * is met (keys(), and so values() and len(); find(), and so counter(),
 * get() and `in`), never skipped and never duplicated.
 *
 * A map can be read-only (an arena opened with readonly=True, mapped
 * without write access): it never writes the mapping, so creation,
 * add() and reset() raise ArenaError instead of faulting.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
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
#define CLAIM_PID_BITS 22
#define CLAIM_START_BITS 24
#define CLAIM_HASH_SHIFT (CLAIM_PID_BITS + CLAIM_START_BITS)
#define CLAIM_PID_MASK ((1ULL << CLAIM_PID_BITS) - 1)
#define CLAIM_START_MASK ((1ULL << CLAIM_START_BITS) - 1)
#define CLAIM_HASH_MASK ((1ULL << 16) - 1)

static inline uint64_t state_ready(uint32_t hash30)
{
    return (STATE_READY << STATE_TAG_SHIFT) | ((uint64_t)hash30 << 32);
}
/* The claim keeps the top 16 of the 30 hash bits. */
static inline uint64_t state_claim(uint32_t hash30, uint32_t start24, uint32_t pid)
{
    return (STATE_CLAIMED << STATE_TAG_SHIFT) | ((uint64_t)(hash30 >> 14) << CLAIM_HASH_SHIFT)
           | ((uint64_t)start24 << CLAIM_PID_BITS) | pid;
}
static inline uint64_t state_tag(uint64_t s) { return s >> STATE_TAG_SHIFT; }
static inline uint32_t ready_hash(uint64_t s) { return (uint32_t)((s >> 32) & STATE_HASH_MASK); }
static inline uint32_t claim_hash16(uint64_t s)
{
    return (uint32_t)((s >> CLAIM_HASH_SHIFT) & CLAIM_HASH_MASK);
}
static inline uint32_t claim_start(uint64_t s)
{
    return (uint32_t)((s >> CLAIM_PID_BITS) & CLAIM_START_MASK);
}
static inline uint32_t claim_pid(uint64_t s) { return (uint32_t)(s & CLAIM_PID_MASK); }

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
    int readonly;           /* mapped without write access: never write */
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
        || __builtin_add_overflow(m->regions_offset, regions_bytes, &regions_end))
        return format_error(m, "arena layout: %u CPU regions of %llu bytes from offset %llu "
                            "pass the 64-bit range", m->ncpu,
                            (unsigned long long)m->region_size,
                            (unsigned long long)m->regions_offset), -1;
    if (regions_end > m->length)
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
                             "regions_offset", "region_size", "ncpu", "readonly", NULL};
    PyObject *buffer;
    unsigned long long table_offset, regions_offset, region_size;
    unsigned int entry_size, key_max, capacity, ncpu;
    int readonly = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKIIIKKI|p:ArenaMap", kwlist, &buffer,
                                     &table_offset, &entry_size, &key_max, &capacity,
                                     &regions_offset, &region_size, &ncpu, &readonly))
        return NULL;
    ArenaMapObject *m = (ArenaMapObject *)type->tp_alloc(type, 0);
    if (!m)
        return NULL;
    m->readonly = readonly;
    /* A read-only map asks for a read-only buffer and never writes it; a
     * writable one insists on write access (a read-only mmap fails here). */
    if (PyObject_GetBuffer(buffer, &m->view,
                           readonly ? PyBUF_SIMPLE : PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
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

/* The start time (field 22 of /proc/PID/stat, clock ticks since boot) of a
 * live process: 1 and *start set; 0 if it is a zombie (dead, not reaped);
 * -1 if /proc cannot tell (not mounted, hidepid, or it just exited). */
static int proc_start_time(uint32_t pid, unsigned long long *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* The command name is in parentheses and may hold anything: fields
     * start after the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return -1;
    p += 2;
    if (*p == 'Z' || *p == 'X')
        return 0;
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p)
            return -1;
        p++;
    }
    char *end;
    *start = strtoull(p, &end, 10);
    return end == p ? -1 : 1;
}

/* The low 24 bits of a start time; 0 is kept for "unknown". */
static uint32_t start_tag(unsigned long long start)
{
    uint32_t tag = (uint32_t)(start & CLAIM_START_MASK);
    return tag ? tag : 1;
}

/* This process's start tag, recomputed after fork(); 0 if unknown. */
static uint32_t self_start_tag(void)
{
    static uint32_t cached_pid, cached_tag;
    uint32_t pid = (uint32_t)getpid();
    if (__atomic_load_n(&cached_pid, __ATOMIC_ACQUIRE) != pid) {
        unsigned long long start;
        uint32_t tag = proc_start_time(pid, &start) == 1 ? start_tag(start) : 0;
        __atomic_store_n(&cached_tag, tag, __ATOMIC_RELAXED);
        __atomic_store_n(&cached_pid, pid, __ATOMIC_RELEASE);
    }
    return __atomic_load_n(&cached_tag, __ATOMIC_RELAXED);
}

/* A claimant is gone when kill(pid, 0) finds no process, when the process is
 * a zombie, or when it started at another time than the claim records (a
 * recycled pid).  When /proc cannot tell, a process that exists is taken as
 * the claimant: waited for, up to the timeout, never overwritten. */
static int claimant_gone(uint64_t claim)
{
    uint32_t pid = claim_pid(claim), recorded = claim_start(claim);
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH)
        return 1;
    unsigned long long start;
    int known = proc_start_time(pid, &start);
    if (known == 0)
        return 1;
    return known == 1 && recorded != 0 && start_tag(start) != recorded;
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

/* Raise ArenaFormatError for a damaged entry i whose state is s.
 * (PyUnicode_FromFormat takes no %llx: the state is formatted here.) */
static void corrupt_state(ArenaMapObject *m, uint32_t i, uint64_t s, const char *why)
{
    char hex[24];
    snprintf(hex, sizeof hex, "%#llx", (unsigned long long)s);
    format_error(m, "arena entry %u is corrupt (state %s: %s)", i, hex, why);
}

/* Check a state word that is not READY: 0 or -1 with ArenaFormatError. */
static int check_unpublished(ArenaMapObject *m, uint32_t i, uint64_t s)
{
    uint64_t tag = state_tag(s);
    if (tag == STATE_EMPTY && s != 0)
        return corrupt_state(m, i, s, "empty with bits set"), -1;
    if (tag == STATE_CLAIMED && claim_pid(s) == 0)
        return corrupt_state(m, i, s, "claimed by pid 0"), -1;
    if (tag != STATE_EMPTY && tag != STATE_CLAIMED && tag != STATE_READY)
        return corrupt_state(m, i, s, "unknown tag"), -1;
    return 0;
}

/* Check a READY entry (state s): unused bits zero, key length in range,
 * stored hash equal to the key's.  Its key length, or 0 with
 * ArenaFormatError naming the entry. */
static uint32_t check_ready(ArenaMapObject *m, uint32_t i, char *e, uint64_t s)
{
    if ((uint32_t)s != 0) {
        corrupt_state(m, i, s, "published with low bits set");
        return 0;
    }
    uint32_t klen = *(volatile uint32_t *)(e + ENTRY_KEY_LENGTH);
    if (klen == 0 || klen > m->key_max) {
        format_error(m, "arena entry %u is corrupt (key length %u, at most %u)",
                     i, klen, m->key_max);
        return 0;
    }
    uint32_t h30 = (uint32_t)(fnv1a64(e + ENTRY_KEY, klen) >> 34);
    if (h30 != ready_hash(s)) {
        char hex[24];
        snprintf(hex, sizeof hex, "%#llx", (unsigned long long)s);
        PyObject *key = PyBytes_FromStringAndSize(e + ENTRY_KEY, klen);
        if (key) {
            format_error(m, "arena entry %u is corrupt (state %s: its stored hash %u is "
                         "not the hash %u of its key %R)", i, hex, ready_hash(s), h30, key);
            Py_DECREF(key);
        }
        return 0;
    }
    return klen;
}

/* Index of `key`, creating it if asked; -1 (not found, not created);
 * -2 with an exception set (a damaged entry, a full arena, a claim that
 * stayed live past `timeout`, or a signal handler that raised). */
static long find_key(ArenaMapObject *m, const char *key, uint32_t length, int create,
                     double timeout)
{
    rseq_module_state *st = PyType_GetModuleState(Py_TYPE(m));
    uint64_t h = fnv1a64(key, length);
    uint32_t h30 = (uint32_t)(h >> 34);
    uint32_t start = (uint32_t)(h % m->capacity);
    double deadline = 0;
    unsigned long waits = 0;

    if (create && m->readonly) {
        PyErr_SetString(st->ArenaError, "the arena is open read-only: no counter can be "
                        "created in it");
        return -2;
    }
    for (uint32_t probe = 0; probe < m->capacity; probe++) {
        uint32_t i = (start + probe) % m->capacity;
        char *e = entry_at(m, i);
        uint64_t *state = entry_state(e);
        for (;;) {
            uint64_t s = __atomic_load_n(state, __ATOMIC_ACQUIRE);
            uint64_t tag = state_tag(s);
            if (tag == STATE_READY) {
                uint32_t klen = check_ready(m, i, e, s);
                if (klen == 0)
                    return -2;
                if (klen == length && memcmp(e + ENTRY_KEY, key, length) == 0)
                    return i;
                break; /* another key: probe on */
            }
            if (check_unpublished(m, i, s) < 0)
                return -2;
            if (tag == STATE_EMPTY) {
                if (!create)
                    return -1;
                uint64_t claim = state_claim(h30, self_start_tag(), (uint32_t)getpid());
                if (__atomic_compare_exchange_n(state, &s, claim, 0, __ATOMIC_ACQ_REL,
                                                __ATOMIC_ACQUIRE)) {
                    fill_entry(m, e, state_ready(h30), key, length);
                    return i;
                }
                continue; /* someone claimed it first: look again */
            }
            /* CLAIMED. */
            if (claim_hash16(s) != h30 >> 14)
                break; /* another key's creation: probe on */
            /* A claim our key may be in.  Our key cannot be published
             * further on (its creator would have stopped here), so a
             * lookup that does not create answers "absent" at once: the
             * creation has not happened yet. */
            if (!create)
                return -1;
            if (claimant_gone(s)) {
                uint64_t claim = state_claim(h30, self_start_tag(), (uint32_t)getpid());
                if (__atomic_compare_exchange_n(state, &s, claim, 0, __ATOMIC_ACQ_REL,
                                                __ATOMIC_ACQUIRE)) {
                    fill_entry(m, e, state_ready(h30), key, length);
                    return i;
                }
                continue;
            }
            double now = monotonic_seconds();
            if (deadline == 0)
                deadline = now + timeout;
            else if (now > deadline) {
                char seconds[32];
                snprintf(seconds, sizeof seconds, "%.1f", timeout);
                PyObject *name = PyUnicode_DecodeUTF8(key, length, "replace");
                if (name) {
                    PyErr_Format(st->ArenaError,
                                 "waited %s s for arena entry %u, where key %R would be "
                                 "created: it stays claimed by live process %u (stopped? "
                                 "it started at clock tick %u modulo 2^24)", seconds, i,
                                 name, claim_pid(s), claim_start(s));
                    Py_DECREF(name);
                }
                return -2;
            }
            /* Yield first (the claimant is usually between two stores), then
             * sleep: a stopped claimant should not cost a CPU.  Ctrl-C and
             * every other signal handler are answered on each round. */
            Py_BEGIN_ALLOW_THREADS
            if (waits++ < 100) {
                sched_yield();
            } else {
                struct timespec pause = {0, 1000000};
                nanosleep(&pause, NULL);
            }
            Py_END_ALLOW_THREADS
            if (PyErr_CheckSignals() < 0)
                return -2;
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
        uint32_t klen = 0;
        if (state_tag(s) == STATE_READY ? (klen = check_ready(m, i, e, s)) == 0
                                         : check_unpublished(m, i, s) < 0) {
            Py_DECREF(list);
            return NULL;
        }
        if (state_tag(s) != STATE_READY)
            continue; /* empty, or a creation not finished yet */
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

/* (name, claimant pid, claimant start tag) of an entry, without raising for
 * a damaged one: the stress harness and the tests look at every state. */
static PyObject *arena_map_entry_state(ArenaMapObject *m, PyObject *arg)
{
    unsigned long i = PyLong_AsUnsignedLong(arg);
    if (i == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (i >= m->capacity) {
        PyErr_Format(PyExc_IndexError, "entry %lu out of range (capacity %u)", i, m->capacity);
        return NULL;
    }
    char *e = entry_at(m, (uint32_t)i);
    uint64_t s = __atomic_load_n(entry_state(e), __ATOMIC_ACQUIRE);
    const char *name;
    uint32_t pid = 0, started = 0;
    if (state_tag(s) == STATE_READY) {
        name = check_ready(m, (uint32_t)i, e, s) ? "ready" : "corrupt";
        PyErr_Clear();
    } else if (check_unpublished(m, (uint32_t)i, s) < 0) {
        name = "corrupt";
        PyErr_Clear();
    } else if (state_tag(s) == STATE_CLAIMED) {
        name = "claimed";
        pid = claim_pid(s);
        started = claim_start(s);
    } else {
        name = "empty";
    }
    return Py_BuildValue("(sII)", name, pid, started);
}

/* The start tag this process records in its claims (tests compare it with
 * rseq._procid). */
static PyObject *arena_map_claim_identity(ArenaMapObject *Py_UNUSED(m),
                                          PyObject *Py_UNUSED(unused))
{
    return Py_BuildValue("(II)", (unsigned int)getpid(), self_start_tag());
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
    uint64_t s = __atomic_load_n(entry_state(e), __ATOMIC_ACQUIRE);
    if (state_tag(s) != STATE_READY) {
        PyErr_Format(PyExc_ValueError, "arena entry %u is not a published counter", index);
        return NULL;
    }
    if (check_ready(m, index, e, s) == 0)
        return NULL;
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

/* Counters of a read-only map.  The shared methods write: add() and reset()
 * obviously, and value() and removed() too, since they read the 16-byte
 * baseline with a compare-and-swap (the one portable atomic 16-byte load),
 * which faults on a read-only page.  So an ArenaCounter's methods are the
 * shared ones wrapped: writes are refused on a read-only map, and the
 * baseline is read with plain loads (high, low, high again until the high
 * word is stable: a reset() that lands between the loads changes both words
 * at once, so a stable high word means the low word belongs with it). */
static inline int counter_is_readonly(CounterObject *c)
{
    return ((ArenaMapObject *)c->owner)->readonly;
}

static PyObject *refuse_write(CounterObject *c, const char *what)
{
    rseq_module_state *st = PyType_GetModuleState(Py_TYPE(c->owner));
    PyErr_Format(st->ArenaError, "%s(): counter %R is in an arena opened read-only",
                 what, c->key);
    return NULL;
}

static __int128 baseline_without_writing(CounterObject *c)
{
    volatile int64_t *words = (volatile int64_t *)c->slots.baseline;
    for (;;) {
        /* little-endian: word 1 is the high half */
        int64_t high = __atomic_load_n(&words[1], __ATOMIC_ACQUIRE);
        uint64_t low = (uint64_t)__atomic_load_n(&words[0], __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&words[1], __ATOMIC_ACQUIRE) == high)
            return ((__int128)high << 64) | low;
    }
}

static PyObject *(*shared_add)(PyObject *, PyObject *const *, Py_ssize_t, PyObject *);
static PyCFunction shared_reset, shared_value, shared_removed;

static PyObject *arena_counter_add(CounterObject *c, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    if (__builtin_expect(counter_is_readonly(c), 0))
        return refuse_write(c, "add");
    return shared_add((PyObject *)c, args, nargs, kwnames);
}

static PyObject *arena_counter_reset(CounterObject *c, PyObject *unused)
{
    if (counter_is_readonly(c))
        return refuse_write(c, "reset");
    return shared_reset((PyObject *)c, unused);
}

static PyObject *arena_counter_value(CounterObject *c, PyObject *unused)
{
    if (!counter_is_readonly(c))
        return shared_value((PyObject *)c, unused);
    __int128 baseline = baseline_without_writing(c);
    return rseq_int128_to_pylong(counter_sum(&c->slots) - baseline);
}

static PyObject *arena_counter_removed(CounterObject *c, PyObject *unused)
{
    if (!counter_is_readonly(c))
        return shared_removed((PyObject *)c, unused);
    return rseq_int128_to_pylong(baseline_without_writing(c));
}

#define ARENA_COUNTER_NMETHODS 16
static PyMethodDef arena_counter_methods[ARENA_COUNTER_NMETHODS];

/* The shared table, with the four methods above in place of their shared
 * versions (same names and docstrings). */
static int build_arena_counter_methods(void)
{
    int n = 0;
    for (PyMethodDef *d = rseq_counter_methods; d->ml_name; d++, n++) {
        if (n + 1 >= ARENA_COUNTER_NMETHODS) {
            PyErr_SetString(PyExc_SystemError, "arena.c: ARENA_COUNTER_NMETHODS is too small");
            return -1;
        }
        arena_counter_methods[n] = *d;
        if (strcmp(d->ml_name, "add") == 0) {
            shared_add = (PyObject *(*)(PyObject *, PyObject *const *, Py_ssize_t,
                                        PyObject *))(void (*)(void))d->ml_meth;
            arena_counter_methods[n].ml_meth = (PyCFunction)(void (*)(void))arena_counter_add;
        } else if (strcmp(d->ml_name, "reset") == 0) {
            shared_reset = d->ml_meth;
            arena_counter_methods[n].ml_meth = (PyCFunction)arena_counter_reset;
        } else if (strcmp(d->ml_name, "value") == 0) {
            shared_value = d->ml_meth;
            arena_counter_methods[n].ml_meth = (PyCFunction)arena_counter_value;
        } else if (strcmp(d->ml_name, "removed") == 0) {
            shared_removed = d->ml_meth;
            arena_counter_methods[n].ml_meth = (PyCFunction)arena_counter_removed;
        }
    }
    memset(&arena_counter_methods[n], 0, sizeof arena_counter_methods[n]);
    if (!shared_add || !shared_reset || !shared_value || !shared_removed) {
        PyErr_SetString(PyExc_SystemError, "arena.c: a shared counter method is missing");
        return -1;
    }
    return 0;
}

static PyObject *arena_counter_repr(CounterObject *c)
{
    PyObject *value = arena_counter_value(c, NULL);
    if (!value)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("<rseq.ArenaCounter key=%R value=%S%s>", c->key, value,
                                       counter_is_readonly(c) ? " read-only" : "");
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
    {Py_tp_methods, arena_counter_methods},
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
     "Index of the counter with this key (bytes), -1 if absent and not created.\n"
     "Creating waits up to `timeout` seconds for a live claimant."},
    {"keys", (PyCFunction)arena_map_keys, METH_NOARGS,
     "keys($self, /)\n--\n\n[(index, key bytes)] of the published counters."},
    {"counter", (PyCFunction)arena_map_counter, METH_VARARGS,
     "counter($self, index, key, /)\n--\n\nThe ArenaCounter at a published index."},
    {"entry_state", (PyCFunction)arena_map_entry_state, METH_O,
     "entry_state($self, index, /)\n--\n\n"
     "(state name, claimant pid, claimant start tag) of an entry; the state is\n"
     "'empty', 'claimed', 'ready' or 'corrupt'."},
    {"claim_identity", (PyCFunction)arena_map_claim_identity, METH_NOARGS,
     "claim_identity($self, /)\n--\n\n"
     "(pid, start tag) this process records when it claims an entry."},
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
    if (build_arena_counter_methods() < 0)
        return -1;
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
