/*
 * ring_type.h - what ring.c (the binding of rseq.Ring) exports to the
 * module files.
 */
#ifndef RSEQ_PY_RING_TYPE_H
#define RSEQ_PY_RING_TYPE_H

#include <Python.h>
#include <stddef.h>

/* Adds _RingMap, RingRecord and the RING_* layout constants. */
int rseq_ring_add_types(PyObject *module);

/* The C API's producer (rseq/capi.h, version 3). */
void *rseq_ring_handle(PyObject *ring);
int rseq_ring_put(void *handle, const void *data, size_t length);

#endif /* RSEQ_PY_RING_TYPE_H */
