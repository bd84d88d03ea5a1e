/*
 * capi_ext.c - a minimal client of rseq's C API, built by tests/test_capi.py.
 *
 * It does what a third-party extension would: import the capsule with
 * rseq_capi_import(), check its size, version and signature, and call each
 * version-1 member.  watch_thread_exit() also checks, from a pthread key
 * destructor that runs after rseq's own, that an exiting thread's area is
 * no longer registered with the kernel once rseq has freed it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
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

static PyMethodDef methods[] = {
    {"import_api", import_api, METH_NOARGS, NULL},
    {"thread_area", thread_area, METH_NOARGS, NULL},
    {"thread_area_size", thread_area_size, METH_NOARGS, NULL},
    {"current_cpu", current_cpu, METH_NOARGS, NULL},
    {"area_cpu_id", area_cpu_id, METH_NOARGS, NULL},
    {"register_thread", register_thread, METH_NOARGS, NULL},
    {"unregister_thread", unregister_thread, METH_NOARGS, NULL},
    {"watch_thread_exit", watch_thread_exit, METH_O, NULL},
    {"exit_report", exit_report, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "capi_ext", "A test client of rseq's C API.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_capi_ext(void) { return PyModule_Create(&module); }
