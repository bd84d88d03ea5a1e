/*
 * counter_type.h - the Python object layout and methods shared by
 * rseq.PerCpuCounter (counter.c) and rseq.ArenaCounter (arena.c).
 */
#ifndef RSEQ_PY_COUNTER_TYPE_H
#define RSEQ_PY_COUNTER_TYPE_H

#include <Python.h>

#include "counter.h"

/* The test build's types live in rseq._inject, the release build's in rseq. */
#ifdef RSEQ_INJECT
#define RSEQ_TYPE_NAME(name) "rseq._inject." name
#else
#define RSEQ_TYPE_NAME(name) "rseq." name
#endif

typedef struct {
    PyObject_HEAD
    struct counter_slots slots;
    PyObject *owner;        /* ArenaCounter: the ArenaMap keeping the memory mapped */
    PyObject *key;          /* ArenaCounter: its key (str) */
    uint32_t pool_index;    /* PerCpuCounter: its place in the private pool */
} CounterObject;

extern PyMethodDef rseq_counter_methods[];
extern PyGetSetDef rseq_counter_getset[];

PyObject *rseq_int128_to_pylong(__int128 v);
PyObject *rseq_counter_value(CounterObject *self, PyObject *unused);
PyObject *rseq_counter_get_index(CounterObject *self, void *closure);

int rseq_counter_add_types(PyObject *module);
int rseq_arena_add_types(PyObject *module);

#endif /* RSEQ_PY_COUNTER_TYPE_H */
