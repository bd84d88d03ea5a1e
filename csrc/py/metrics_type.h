/*
 * metrics_type.h - the rseq.metrics types of rseq._core (metrics.c).
 */
#ifndef RSEQ_PY_METRICS_TYPE_H
#define RSEQ_PY_METRICS_TYPE_H

#include <Python.h>

/* _MetricsMap, _CounterBase, _ObserveBase, _GaugeBase. */
int rseq_metrics_add_types(PyObject *module);

#endif /* RSEQ_PY_METRICS_TYPE_H */
