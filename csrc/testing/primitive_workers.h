/*
 * primitive_workers.h - stress workers for each per-CPU primitive of
 * percpu.h, exported by the test build rseq._inject to the stress harness
 * (src/rseq/testing/stress.py, primitive_case()): the binding of the pure-C
 * workload of workload.h.
 *
 *   PRIMITIVES                            names, one per primitive
 *   primitive_size(name, nworkers)        bytes of shared state
 *   primitive_init(name, buffer, nworkers)
 *   primitive_run(name, buffer, worker, reps, index)
 *   primitive_check(name, buffer, nworkers, reps) -> (expected, got)
 *
 * The state lives in a caller-supplied writable buffer (an anonymous shared
 * mmap, so forked workers share it) and holds no pointer: lists link nodes by
 * their offset from the buffer, so the state is valid at any mapping address.
 * It starts with a header (magic, version, layout) that every call validates
 * before it trusts an offset.  Details in workload.h.
 */
#ifndef RSEQ_PY_PRIMITIVE_WORKERS_H
#define RSEQ_PY_PRIMITIVE_WORKERS_H

#include <Python.h>

PyObject *rseq_py_primitive_size(PyObject *module, PyObject *args);
PyObject *rseq_py_primitive_init(PyObject *module, PyObject *args);
PyObject *rseq_py_primitive_run(PyObject *module, PyObject *args);
PyObject *rseq_py_primitive_check(PyObject *module, PyObject *args);
extern const char rseq_py_primitive_size_doc[];
extern const char rseq_py_primitive_init_doc[];
extern const char rseq_py_primitive_run_doc[];
extern const char rseq_py_primitive_check_doc[];

#define RSEQ_PRIMITIVE_METHODS                                                        \
    {"primitive_size", rseq_py_primitive_size, METH_VARARGS, rseq_py_primitive_size_doc}, \
    {"primitive_init", rseq_py_primitive_init, METH_VARARGS, rseq_py_primitive_init_doc}, \
    {"primitive_run", rseq_py_primitive_run, METH_VARARGS, rseq_py_primitive_run_doc},    \
    {"primitive_check", rseq_py_primitive_check, METH_VARARGS, rseq_py_primitive_check_doc},

/* Adds PRIMITIVES (a tuple of str) to the module: 0, or -1 with an exception. */
int rseq_primitive_add_constants(PyObject *module);

#endif /* RSEQ_PY_PRIMITIVE_WORKERS_H */
