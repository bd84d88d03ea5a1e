/*
 * inject_module.c - rseq._inject, the test build of the per-CPU code.
 *
 * The same counter and arena sources as rseq._core, compiled with
 * RSEQ_INJECT=1 so that every critical section carries its numbered delay
 * loops, plus the controls of those loops.  It has no registration code: it
 * takes the calling thread's area from rseq._core's C API, exactly as any
 * third-party extension would (RSEQ_CAPI_CLIENT), so loading it never
 * creates a second registrant.  Used by the stress harness and the tests;
 * the release module carries no injection code at all.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include "core.h"
#include "counter_type.h"
#include "inject.h"
#include "primitive_workers.h"
#include "ring_type.h"
#include "rseq/abi.h"
#include "rseq/capi.h"
#include "workload.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <unistd.h>

#include "registration.h"

RSEQ_INJECT_DEFINE_GLOBALS

const struct rseq_capi *rseq_client_api;

static PyObject *py_set_loops(PyObject *module, PyObject *args)
{
    (void)module;
    int point;
    unsigned int loops;
    if (!PyArg_ParseTuple(args, "iI:set_loops", &point, &loops))
        return NULL;
    if (point < 1 || point >= RSEQ_INJECT_POINTS) {
        PyErr_Format(PyExc_ValueError, "injection point %d: points are 1..%d", point,
                     RSEQ_INJECT_POINTS - 1);
        return NULL;
    }
    __atomic_store_n(&rseq_inject_loops[point], loops, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *py_get_loops(PyObject *module, PyObject *Py_UNUSED(unused))
{
    (void)module;
    PyObject *list = PyList_New(RSEQ_INJECT_POINTS);
    for (int i = 0; list && i < RSEQ_INJECT_POINTS; i++)
        PyList_SET_ITEM(list, i, PyLong_FromUnsignedLong(
            __atomic_load_n(&rseq_inject_loops[i], __ATOMIC_RELAXED)));
    return list;
}

static PyObject *py_set_mode(PyObject *module, PyObject *args, PyObject *kwds)
{
    (void)module;
    static char *kwlist[] = {"mode", "every", "sleep_us", "signal", NULL};
    int mode = 0, signal = 0;
    unsigned int every = 0, sleep_us = 1000;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|IIi:set_mode", kwlist, &mode, &every,
                                     &sleep_us, &signal))
        return NULL;
    if (mode & ~(RSEQ_INJECT_MODE_YIELD | RSEQ_INJECT_MODE_SLEEP | RSEQ_INJECT_MODE_SIGNAL)) {
        PyErr_Format(PyExc_ValueError, "unknown injection mode bits 0x%x", mode);
        return NULL;
    }
    __atomic_store_n(&rseq_inject_every, every, __ATOMIC_RELAXED);
    __atomic_store_n(&rseq_inject_sleep_us, sleep_us, __ATOMIC_RELAXED);
    __atomic_store_n(&rseq_inject_signal, signal, __ATOMIC_RELAXED);
    __atomic_store_n(&rseq_inject_mode, mode, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *py_aborts(PyObject *module, PyObject *Py_UNUSED(unused))
{
    (void)module;
    return PyLong_FromUnsignedLong(__atomic_load_n(&rseq_inject_aborts, __ATOMIC_RELAXED));
}

static PyObject *py_reset(PyObject *module, PyObject *Py_UNUSED(unused))
{
    (void)module;
    for (int i = 0; i < RSEQ_INJECT_POINTS; i++)
        __atomic_store_n(&rseq_inject_loops[i], 0, __ATOMIC_RELAXED);
    __atomic_store_n(&rseq_inject_mode, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&rseq_inject_every, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&rseq_inject_aborts, 0, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *py_rseq_syscall(PyObject *module, PyObject *args)
{
    (void)module;
    unsigned long long address;
    unsigned int length, signature;
    int flags;
    long ret;
    if (!PyArg_ParseTuple(args, "KIiI:rseq_syscall", &address, &length, &flags, &signature))
        return NULL;
#ifdef RSEQ_SYS_RSEQ
    Py_BEGIN_ALLOW_THREADS
    ret = syscall(RSEQ_SYS_RSEQ, (void *)(uintptr_t)address, length, flags, signature);
    if (ret != 0)
        ret = -errno;
    Py_END_ALLOW_THREADS
#else
    (void)address; (void)length; (void)flags; (void)signature;
    ret = -ENOSYS;
#endif
    return PyLong_FromLong(ret);
}

/* ---------------------------------------------------------------------------
 * _set_registration_count: the release module exports no such hook, so the
 * test build finds rseq._core's per-thread state (struct rseq_thread of
 * registration.h, reached through the pthread key registration.c stores it
 * under) by watching which candidate the C API's register_thread() moves.
 * ------------------------------------------------------------------------- */

#define KEY_SCAN PTHREAD_KEYS_MAX

/* The keys whose value looks like this thread's state: same area, same
 * usable size as the C API reports.  Fills refcounts; returns how many. */
static int state_candidates(struct rseq_abi *area, uint32_t size, pthread_key_t *keys,
                            uint32_t *refcounts)
{
    int n = 0;
    for (pthread_key_t k = 0; k < KEY_SCAN; k++) {
        const struct rseq_thread *t = pthread_getspecific(k);
        if (t && t->area == area && t->usable_size == size) {
            keys[n] = k;
            refcounts[n++] = t->refcount;
        }
    }
    return n;
}

static PyObject *py_set_registration_count(PyObject *module, PyObject *arg)
{
    (void)module;
    pthread_key_t keys[KEY_SCAN], found_keys[KEY_SCAN];
    uint32_t before[KEY_SCAN], after[KEY_SCAN];
    unsigned long count = PyLong_AsUnsignedLong(arg);
    if (count == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (count > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "count must fit in 32 bits");
        return NULL;
    }
    struct rseq_abi *area = rseq_client_api->thread_area();
    uint32_t size = rseq_client_api->thread_area_size();
    if (!area) {
        PyErr_SetString(PyExc_RuntimeError, "this thread has no rseq area");
        return NULL;
    }
    int n = state_candidates(area, size, keys, before);
    /* One register() moves the state's count by +1; at the limit, one
     * unregister() moves it by -1 (and releases nothing: the count stays
     * far above zero). */
    int up = rseq_client_api->register_thread() == 0;
    if (!up && rseq_client_api->unregister_thread() < 0) {
        PyErr_SetString(PyExc_RuntimeError, "register() and unregister() both failed");
        return NULL;
    }
    int m = state_candidates(area, size, found_keys, after);
    struct rseq_thread *state = NULL;
    int matches = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < m; j++)
            if (keys[i] == found_keys[j] && after[j] == before[i] + (up ? 1u : -1u)) {
                state = pthread_getspecific(keys[i]);
                matches++;
            }
    if (matches != 1) {
        PyErr_Format(PyExc_RuntimeError, "rseq._core's thread state not found (%d candidates)",
                     matches);
        return NULL;
    }
    state->refcount = (uint32_t)count;
    Py_RETURN_NONE;
}

/* INJECTION_POINTS: {structure: (point, ...)} from workload.h's table. */
static int add_injection_points(PyObject *module)
{
    PyObject *table = PyDict_New();
    if (!table)
        return -1;
    for (size_t i = 0; i < workload_points_count; i++) {
        PyObject *points = PyList_New(0);
        int ok = points != NULL;
        for (int p = 1; ok && p < RSEQ_INJECT_POINTS; p++) {
            if (!(workload_points[i].mask & (1u << p)))
                continue;
            PyObject *n = PyLong_FromLong(p);
            ok = n && PyList_Append(points, n) == 0;
            Py_XDECREF(n);
        }
        PyObject *tuple = ok ? PyList_AsTuple(points) : NULL;
        Py_XDECREF(points);
        if (!tuple || PyDict_SetItemString(table, workload_points[i].name, tuple) < 0) {
            Py_XDECREF(tuple);
            Py_DECREF(table);
            return -1;
        }
        Py_DECREF(tuple);
    }
    int ret = PyModule_AddObjectRef(module, "INJECTION_POINTS", table);
    Py_DECREF(table);
    return ret;
}

static PyMethodDef module_methods[] = {
    {"_set_registration_count", py_set_registration_count, METH_O,
     "_set_registration_count(count, /)\n--\n\n"
     "Tests only: set the calling thread's register() reference count in\n"
     "rseq._core (which exports no such hook), to reach its limit quickly."},
    {"rseq_syscall", py_rseq_syscall, METH_VARARGS,
     "rseq_syscall(address, length, flags, signature, /)\n--\n\n"
     "The raw rseq(2) system call: returns 0 or -errno, never raises for the\n"
     "call's own failure.  For conformance tests: registering or unregistering\n"
     "memory this way bypasses every safety of the package."},
    {"set_loops", py_set_loops, METH_VARARGS,
     "set_loops(point, loops, /)\n--\n\nSpin count of injection point 1..9 (0: off)."},
    {"get_loops", py_get_loops, METH_NOARGS, "get_loops()\n--\n\nSpin counts by point."},
    {"set_mode", (PyCFunction)(void (*)(void))py_set_mode, METH_VARARGS | METH_KEYWORDS,
     "set_mode(mode, every=0, sleep_us=1000, signal=0)\n--\n\n"
     "What the C points do every `every`-th pass: MODE_YIELD | MODE_SLEEP |\n"
     "MODE_SIGNAL (raise `signal`, default SIGUSR1: install a handler first)."},
    {"aborts", py_aborts, METH_NOARGS, "aborts()\n--\n\nAborted sequences seen so far."},
    {"reset", py_reset, METH_NOARGS, "reset()\n--\n\nAll points off, counts zero."},
    RSEQ_PRIMITIVE_METHODS
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *module)
{
    rseq_module_state *st = PyModule_GetState(module);
    rseq_client_api = rseq_capi_import();
    if (!rseq_client_api)
        return -1;
    PyObject *core = PyImport_ImportModule("rseq._core");
    if (!core)
        return -1;
    /* The same exception classes as the release module. */
#define TAKE(name) \
    if (!(st->name = PyObject_GetAttrString(core, #name))) { Py_DECREF(core); return -1; }
    TAKE(RseqError) TAKE(Unsupported) TAKE(RegistrationError) TAKE(NotOwnedWarning)
    TAKE(ArenaError) TAKE(ArenaFormatError) TAKE(ArenaFullError)
#undef TAKE
    Py_DECREF(core);
    if (rseq_counter_add_types(module) < 0 || rseq_arena_add_types(module) < 0
        || rseq_pool_add_types(module) < 0 || rseq_primitive_add_constants(module) < 0
        || add_injection_points(module) < 0 || rseq_ring_add_types(module) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "POINTS", RSEQ_INJECT_POINTS) < 0
        || PyModule_AddIntConstant(module, "MODE_YIELD", RSEQ_INJECT_MODE_YIELD) < 0
        || PyModule_AddIntConstant(module, "MODE_SLEEP", RSEQ_INJECT_MODE_SLEEP) < 0
        || PyModule_AddIntConstant(module, "MODE_SIGNAL", RSEQ_INJECT_MODE_SIGNAL) < 0)
        return -1;
    return 0;
}


static PyModuleDef_Slot module_slots[] = RSEQ_MODULE_SLOTS(module_exec);

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rseq._inject",
    .m_doc = "The test build of rseq's per-CPU code, with delay-injection points.",
    .m_size = sizeof(rseq_module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = rseq_state_traverse,
    .m_clear = rseq_state_clear,
    .m_free = rseq_state_free,
};

PyMODINIT_FUNC PyInit__inject(void)
{
    return PyModuleDef_Init(&module_def);
}
