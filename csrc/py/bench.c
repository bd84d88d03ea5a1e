/*
 * bench.c - the binding of the C-level timing (csrc/lib/percpu_bench.c) for
 * `python -m rseq bench`, so the C figures come from the same run as the
 * Python ones.  The GIL is released while the pinned threads run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "core.h"
#include "percpu_bench.h"

const char rseq_py_bench_c_doc[] =
"_bench_c($module, kind, threads, iterations, /)\n--\n\n"
"ns per operation per thread of `kind` ('rseq_add', 'atomic_add',\n"
"'cpu_read', 'sched_getcpu' or 'fallback_add') with `threads` pinned\n"
"pthreads; checks the totals.";

PyObject *rseq_py_bench_c(PyObject *module, PyObject *args)
{
    (void)module;
    const char *kind_name, *error = NULL;
    int nthreads, kind, ret;
    long iterations;
    double ns = 0;
    if (!PyArg_ParseTuple(args, "sil:_bench_c", &kind_name, &nthreads, &iterations))
        return NULL;
    if ((kind = rseq_bench_kind(kind_name)) < 0) {
        PyErr_Format(PyExc_ValueError, "unknown benchmark %s", kind_name);
        return NULL;
    }
    if (nthreads < 1 || nthreads > RSEQ_BENCH_MAX_THREADS || iterations < 1) {
        PyErr_SetString(PyExc_ValueError, "1..64 threads and a positive iteration count");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ret = rseq_bench_run((enum rseq_bench_kind)kind, nthreads, iterations, &ns, &error);
    Py_END_ALLOW_THREADS
    if (ret < 0) {
        PyErr_SetString(PyExc_RuntimeError, error);
        return NULL;
    }
    return PyFloat_FromDouble(ns);
}
