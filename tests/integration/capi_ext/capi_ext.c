/*
 * capi_ext.c - a minimal client of rseq's C API, built by tests/test_capi.py.
 *
 * It does what a third-party extension would: import the capsule with
 * rseq_capi_import(), check its size, version and signature, call each
 * version-1 member, and run each version-2 per-CPU primitive with retry
 * loops, from several threads at once where the result can be checked.  watch_thread_exit() also checks, from a pthread key
 * destructor that runs after rseq's own, that an exiting thread's area is
 * no longer registered with the kernel once rseq has freed it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <rseq/capi.h>

static const struct rseq_capi *api;

static PyObject *import_api(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    api = rseq_capi_import();
    if (!api)
        return NULL;
    return Py_BuildValue(
        "{s:I,s:I,s:I,s:O,s:O,s:n}",
        "size", api->size, "version", api->version, "signature", api->signature,
        "has_v1", RSEQ_CAPI_HAS(api, unregister_thread) ? Py_True : Py_False,
        "has_current_index", RSEQ_CAPI_HAS(api, current_index) ? Py_True : Py_False,
        "v1_end", (Py_ssize_t)(offsetof(struct rseq_capi, unregister_thread)
                               + sizeof(api->unregister_thread)));
}

#define NEED_API() \
    do { if (!api) { PyErr_SetString(PyExc_RuntimeError, "import_api() first"); return NULL; } } while (0)

static PyObject *thread_area(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    NEED_API();
    struct rseq_abi *area = api->thread_area();
    if (!area)
        Py_RETURN_NONE;
    return PyLong_FromVoidPtr(area);
}

static PyObject *thread_area_size(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    NEED_API();
    return PyLong_FromUnsignedLong(api->thread_area_size());
}

static PyObject *current_cpu(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    NEED_API();
    return PyLong_FromLong(api->current_cpu());
}

/* cpu_id as the area says it, read the way an extension would. */
static PyObject *area_cpu_id(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    NEED_API();
    struct rseq_abi *area = api->thread_area();
    if (!area)
        Py_RETURN_NONE;
    return PyLong_FromLong((int32_t)__atomic_load_n(&area->cpu_id, __ATOMIC_RELAXED));
}

static PyObject *register_thread(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    NEED_API();
    return PyLong_FromLong(api->register_thread());
}

static PyObject *unregister_thread(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    NEED_API();
    return PyLong_FromLong(api->unregister_thread());
}

/* ------------------------------------------------------------------------
 * Thread exit: is the area unregistered after rseq's destructor ran?
 * ------------------------------------------------------------------------ */

struct watched { void *area; unsigned int length; };

static pthread_key_t watch_key;
static pthread_once_t watch_once = PTHREAD_ONCE_INIT;
static unsigned long exits_checked, exits_still_registered, exits_other;
static int exits_last_errno;

static void watch_destructor(void *arg)
{
    struct watched *w = arg;
    /* Unregistering an area that is no longer registered answers EINVAL;
     * success would mean rseq left the kernel using memory it freed. */
    long ret = syscall(334, w->area, w->length, 1 /* RSEQ_FLAG_UNREGISTER */,
                       api->signature);
    int err = ret == 0 ? 0 : errno;
    __atomic_fetch_add(&exits_checked, 1, __ATOMIC_RELAXED);
    if (ret == 0)
        __atomic_fetch_add(&exits_still_registered, 1, __ATOMIC_RELAXED);
    else if (err != EINVAL) {
        __atomic_fetch_add(&exits_other, 1, __ATOMIC_RELAXED);
        exits_last_errno = err;
    }
    free(w);
}

static void watch_key_create(void) { (void)pthread_key_create(&watch_key, watch_destructor); }

static PyObject *watch_thread_exit(PyObject *self, PyObject *arg)
{
    (void)self;
    NEED_API();
    unsigned long length = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    struct rseq_abi *area = api->thread_area();
    if (!area) {
        PyErr_SetString(PyExc_RuntimeError, "this thread has no rseq area");
        return NULL;
    }
    /* Created after rseq._core's key, so its destructor runs after rseq's. */
    pthread_once(&watch_once, watch_key_create);
    struct watched *w = malloc(sizeof *w);
    if (!w)
        return PyErr_NoMemory();
    w->area = area;
    w->length = (unsigned int)length;
    pthread_setspecific(watch_key, w);
    Py_RETURN_NONE;
}

static PyObject *exit_report(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    return Py_BuildValue("{s:k,s:k,s:k,s:i}", "checked", exits_checked,
                         "still_registered", exits_still_registered,
                         "other_errors", exits_other, "last_errno", exits_last_errno);
}

/* ------------------------------------------------------------------------
 * The per-CPU primitives (version 2), as a client would use them
 * ------------------------------------------------------------------------ */

#define MAX_CPUS 1024
#define LINE 8 /* intptr_t per 64-byte line: one line per CPU */

static intptr_t add_slots[MAX_CPUS * LINE] __attribute__((aligned(64)));

struct node { intptr_t next; intptr_t id; };
static intptr_t list_heads[MAX_CPUS * LINE] __attribute__((aligned(64)));
static struct node *nodes;
static long nnodes;

/* `reps` adds of 1 on the caller's CPU slot: current_index + load_add_store,
 * retried on abort, with the GIL released so threads really run at once. */
static PyObject *percpu_add(PyObject *self, PyObject *arg)
{
    (void)self;
    long reps = PyLong_AsLong(arg);
    if (reps < 0 && PyErr_Occurred())
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    struct rseq_abi *area = api->thread_area();
    for (long i = 0; i < reps; i++) {
        int cpu, ret;
        do {
            cpu = api->current_index(area, RSEQ_CAPI_INDEX_CPU_ID);
            ret = api->load_add_store(area, RSEQ_CAPI_INDEX_CPU_ID,
                                      &add_slots[(cpu % MAX_CPUS) * LINE], 1, cpu);
        } while (ret < 0);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *percpu_sum(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    long long sum = 0;
    for (int c = 0; c < MAX_CPUS; c++)
        sum += __atomic_load_n(&add_slots[c * LINE], __ATOMIC_RELAXED);
    return PyLong_FromLongLong(sum);
}

static void push(struct rseq_abi *area, struct node *n)
{
    for (;;) {
        int cpu = api->current_index(area, RSEQ_CAPI_INDEX_CPU_ID);
        intptr_t *head = &list_heads[(cpu % MAX_CPUS) * LINE];
        intptr_t expect = __atomic_load_n(head, __ATOMIC_RELAXED);
        if (api->load_cbne_store_store(area, RSEQ_CAPI_INDEX_CPU_ID, head, expect, &n->next,
                                       expect, (intptr_t)n, cpu) == 0)
            return;
    }
}

static struct node *pop(struct rseq_abi *area)
{
    for (;;) {
        int cpu = api->current_index(area, RSEQ_CAPI_INDEX_CPU_ID);
        intptr_t loaded = 0;
        int ret = api->load_cbeq_store_load_store(area, RSEQ_CAPI_INDEX_CPU_ID,
                                                  &list_heads[(cpu % MAX_CPUS) * LINE], 0,
                                                  offsetof(struct node, next), &loaded, cpu);
        if (ret == 0)
            return (struct node *)loaded;
        if (ret > 0)
            return NULL; /* this CPU's list is empty */
    }
}

/* list_init(n): n nodes pushed on the caller's CPU list(s). */
static PyObject *list_init(PyObject *self, PyObject *arg)
{
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n <= 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "n must be positive");
        return NULL;
    }
    free(nodes);
    memset(list_heads, 0, sizeof list_heads);
    nodes = calloc((size_t)n, sizeof *nodes);
    if (!nodes)
        return PyErr_NoMemory();
    nnodes = n;
    struct rseq_abi *area = api->thread_area();
    for (long i = 0; i < n; i++) {
        nodes[i].id = i;
        push(area, &nodes[i]);
    }
    Py_RETURN_NONE;
}

/* list_churn(rounds): pop a node from this CPU's list and push it back
 * (wherever the thread is by then), GIL released; returns empty pops. */
static PyObject *list_churn(PyObject *self, PyObject *arg)
{
    (void)self;
    long rounds = PyLong_AsLong(arg);
    if (rounds < 0 && PyErr_Occurred())
        return NULL;
    long empty = 0;
    Py_BEGIN_ALLOW_THREADS
    struct rseq_abi *area = api->thread_area();
    for (long i = 0; i < rounds; i++) {
        struct node *n = pop(area);
        if (n)
            push(area, n);
        else
            empty++;
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(empty);
}

/* list_census(): (nodes found, distinct nodes) walking every list once the
 * threads are done; equal to (n, n) when no node was lost or duplicated. */
static PyObject *list_census(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    char *seen = calloc((size_t)nnodes, 1);
    if (!seen)
        return PyErr_NoMemory();
    long found = 0, distinct = 0;
    for (int c = 0; c < MAX_CPUS; c++) {
        for (struct node *n = (struct node *)list_heads[c * LINE]; n && found <= nnodes;
             n = (struct node *)n->next) {
            found++;
            if (n < nodes || n >= nodes + nnodes)
                continue; /* not one of ours: counted, never distinct */
            if (!seen[n - nodes]++)
                distinct++;
        }
    }
    free(seen);
    return Py_BuildValue("(ll)", found, distinct);
}

/* bov_and_memcpy(): the overflow-checked add refuses to wrap, and the copy
 * lands with its commit; returns (first add, overflowing add, slot, copied). */
static PyObject *bov_and_memcpy(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    static intptr_t slots[MAX_CPUS * LINE] __attribute__((aligned(64)));
    static intptr_t versions[MAX_CPUS * LINE] __attribute__((aligned(64)));
    static char copies[MAX_CPUS][16];
    struct rseq_abi *area = api->thread_area();
    int first, second, copied, cpu;
    do {
        cpu = api->current_index(area, RSEQ_CAPI_INDEX_CPU_ID);
        slots[(cpu % MAX_CPUS) * LINE] = INTPTR_MAX - 1;
        first = api->load_add_bov_store(area, RSEQ_CAPI_INDEX_CPU_ID,
                                        &slots[(cpu % MAX_CPUS) * LINE], 1, cpu);
        if (first < 0)
            continue;
        second = api->load_add_bov_store(area, RSEQ_CAPI_INDEX_CPU_ID,
                                         &slots[(cpu % MAX_CPUS) * LINE], 1, cpu);
    } while (first < 0 || second < 0);
    intptr_t value = slots[(cpu % MAX_CPUS) * LINE];
    do {
        cpu = api->current_index(area, RSEQ_CAPI_INDEX_CPU_ID);
        copied = api->load_cbne_memcpy_store(area, RSEQ_CAPI_INDEX_CPU_ID,
                                             &versions[(cpu % MAX_CPUS) * LINE],
                                             versions[(cpu % MAX_CPUS) * LINE],
                                             copies[cpu % MAX_CPUS], "committed copy!", 16,
                                             versions[(cpu % MAX_CPUS) * LINE] + 1, cpu);
    } while (copied < 0);
    return Py_BuildValue("(iiNis)", first, second, PyLong_FromSsize_t(value),
                         (int)versions[(cpu % MAX_CPUS) * LINE], copies[cpu % MAX_CPUS]);
}

/* pool_churn(pool_map, rounds, hold): allocate and free blocks of an
 * rseq.Pool through the C API (version 3), GIL released, holding up to
 * `hold` at once; each block carries the thread's tag, checked before it is
 * freed.  Returns (clashes, exhausted, errors, block size, block count). */
static PyObject *pool_churn(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *map;
    long rounds, hold;
    NEED_API();
    if (!PyArg_ParseTuple(args, "Oll", &map, &rounds, &hold))
        return NULL;
    if (!RSEQ_CAPI_HAS(api, pool_block_count)) {
        PyErr_SetString(PyExc_RuntimeError, "the C API has no pool functions");
        return NULL;
    }
    struct rseq_capi_pool *pool = api->pool_of(map);
    if (!pool)
        return NULL;
    if (hold < 1 || hold > 16) {
        PyErr_SetString(PyExc_ValueError, "hold in 1..16");
        return NULL;
    }
    long clashes = 0, exhausted = 0, errors = 0;
    Py_BEGIN_ALLOW_THREADS
    uint64_t held[16], tags[16];
    long nheld = 0;
    uint64_t tag = (uint64_t)syscall(SYS_gettid) << 32;
    for (long i = 0; i < rounds; i++) {
        int64_t index = api->pool_alloc(pool);
        if (index == -1) {
            exhausted++;
        } else if (index < 0) {
            errors++;
        } else {
            uint64_t *words = api->pool_block(pool, (uint64_t)index);
            tags[nheld] = tag | (uint64_t)(i & 0xffffffff);
            words[0] = tags[nheld];
            held[nheld++] = (uint64_t)index;
        }
        if (nheld == hold || (nheld && (i & 1))) {
            nheld--;
            uint64_t *words = api->pool_block(pool, held[nheld]);
            clashes += words[0] != tags[nheld];
            if (api->pool_free(pool, held[nheld]) != 0)
                errors++;
        }
    }
    while (nheld) {
        nheld--;
        if (api->pool_free(pool, held[nheld]) != 0)
            errors++;
    }
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(lllKK)", clashes, exhausted, errors,
                         (unsigned long long)api->pool_block_size(pool),
                         (unsigned long long)api->pool_block_count(pool));
}

/* pool_errors(pool_map): the result codes of the C API's pool functions for
 * an index out of range, a double free, and NULL for a block out of range. */
static PyObject *pool_errors(PyObject *self, PyObject *map)
{
    (void)self;
    NEED_API();
    struct rseq_capi_pool *pool = api->pool_of(map);
    if (!pool)
        return NULL;
    uint64_t count = api->pool_block_count(pool);
    int64_t i = api->pool_alloc(pool);
    int first = api->pool_free(pool, (uint64_t)i);
    int again = api->pool_free(pool, (uint64_t)i);
    int range = api->pool_free(pool, count);
    void *beyond = api->pool_block(pool, count);
    return Py_BuildValue("(iiiO)", first, again, range, beyond ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"pool_churn", pool_churn, METH_VARARGS, NULL},
    {"pool_errors", pool_errors, METH_O, NULL},
    {"import_api", import_api, METH_NOARGS, NULL},
    {"thread_area", thread_area, METH_NOARGS, NULL},
    {"thread_area_size", thread_area_size, METH_NOARGS, NULL},
    {"current_cpu", current_cpu, METH_NOARGS, NULL},
    {"area_cpu_id", area_cpu_id, METH_NOARGS, NULL},
    {"register_thread", register_thread, METH_NOARGS, NULL},
    {"unregister_thread", unregister_thread, METH_NOARGS, NULL},
    {"watch_thread_exit", watch_thread_exit, METH_O, NULL},
    {"exit_report", exit_report, METH_NOARGS, NULL},
    {"percpu_add", percpu_add, METH_O, NULL},
    {"percpu_sum", percpu_sum, METH_NOARGS, NULL},
    {"list_init", list_init, METH_O, NULL},
    {"list_churn", list_churn, METH_O, NULL},
    {"list_census", list_census, METH_NOARGS, NULL},
    {"bov_and_memcpy", bov_and_memcpy, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "capi_ext", "A test client of rseq's C API.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_capi_ext(void) { return PyModule_Create(&module); }
