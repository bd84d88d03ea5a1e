/*
 * ring_ext.c - a C extension producing into an rseq.Ring through the C API
 * (version 3: ring_handle + ring_put), from threads, without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <rseq/capi.h>

static const struct rseq_capi *api;

struct job {
    void *handle;
    int worker;
    long n;
    long committed, dropped, errors;
};

static void *run(void *arg)
{
    struct job *j = arg;
    char record[64];
    for (long i = 0; i < j->n; i++) {
        int len = snprintf(record, sizeof record, "c %d %ld", j->worker, i);
        int ret = api->ring_put(j->handle, record, (size_t)len);
        if (ret == 1)
            j->committed++;
        else if (ret == 0)
            j->dropped++;
        else
            j->errors++;
    }
    return NULL;
}

static PyObject *put_from_threads(PyObject *self, PyObject *args)
{
    PyObject *ring;
    int threads;
    long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oil", &ring, &threads, &n))
        return NULL;
    if (!api) {
        api = rseq_capi_import();
        if (!api)
            return NULL;
    }
    if (!RSEQ_CAPI_HAS(api, ring_put)) {
        PyErr_SetString(PyExc_RuntimeError, "rseq C API older than version 3");
        return NULL;
    }
    void *handle = api->ring_handle(ring);
    if (!handle)
        return NULL;
    struct job jobs[16];
    pthread_t tids[16];
    if (threads < 1 || threads > 16) {
        PyErr_SetString(PyExc_ValueError, "1..16 threads");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++) {
        jobs[t] = (struct job){handle, t, n, 0, 0, 0};
        pthread_create(&tids[t], NULL, run, &jobs[t]);
    }
    for (int t = 0; t < threads; t++)
        pthread_join(tids[t], NULL);
    Py_END_ALLOW_THREADS
    long committed = 0, dropped = 0, errors = 0;
    for (int t = 0; t < threads; t++) {
        committed += jobs[t].committed;
        dropped += jobs[t].dropped;
        errors += jobs[t].errors;
    }
    return Py_BuildValue("(lll)", committed, dropped, errors);
}

static PyObject *put_oversized(PyObject *self, PyObject *ring)
{
    (void)self;
    if (!api && !(api = rseq_capi_import()))
        return NULL;
    void *handle = api->ring_handle(ring);
    if (!handle)
        return NULL;
    static char big[1 << 16];
    return PyLong_FromLong(api->ring_put(handle, big, sizeof big));
}

static PyMethodDef methods[] = {
    {"put_from_threads", put_from_threads, METH_VARARGS, NULL},
    {"put_oversized", put_oversized, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "ring_ext", NULL, -1, methods};

PyMODINIT_FUNC PyInit_ring_ext(void) { return PyModule_Create(&module); }
