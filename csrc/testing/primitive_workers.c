/*
 * primitive_workers.c - the Python binding of the stress workload
 * (workload.h) in the test build rseq._inject, for `python -m rseq stress`
 * (src/rseq/testing/stress.py, primitive_case()): argument checks, the
 * validation of a caller's buffer before any offset in it is trusted, and
 * the GIL released around the workers.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "primitive_workers.h"
#include "thread_area.h"
#include "workload.h"

/* The stress command's choices: see WORKLOAD_DEFAULTS. */
static const struct workload_options defaults = WORKLOAD_DEFAULTS;

/* ---------------------------------------------------------------------------
 * Argument validation
 * ------------------------------------------------------------------------- */

static int kind_from_name(const char *name)
{
    for (int k = 0; k < PRIM_COUNT; k++)
        if (strcmp(name, prim_names[k]) == 0)
            return k;
    PyErr_Format(PyExc_ValueError, "unknown primitive '%s': one of cbne, add, bov, list, "
                 "store_store, memcpy", name);
    return -1;
}

static int check_nworkers(int nworkers)
{
    if (nworkers < 1 || nworkers > MAX_WORKERS) {
        PyErr_Format(PyExc_ValueError, "nworkers %d: must be 1..%d", nworkers, MAX_WORKERS);
        return -1;
    }
    return 0;
}

/* The state in `view`, validated: the header must be primitive_init's for
 * `kind` and this machine, and the buffer must hold the whole layout.
 * nworkers < 0: take the header's. */
static struct prim_header *state_open(Py_buffer *view, int kind, int nworkers)
{
    struct prim_header *hdr = view->buf;
    struct prim_layout want;

    if ((uintptr_t)view->buf % CACHELINE != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer is not 64-byte aligned (use an mmap)");
        return NULL;
    }
    if ((size_t)view->len < sizeof(*hdr)
        || __atomic_load_n(&hdr->magic, __ATOMIC_ACQUIRE) != PRIM_MAGIC) {
        PyErr_SetString(PyExc_ValueError, "buffer not initialised by primitive_init()");
        return NULL;
    }
    if (hdr->version != PRIM_VERSION || hdr->header_size != sizeof(*hdr)) {
        PyErr_Format(PyExc_ValueError, "primitive state version %u (header %u bytes): "
                     "this build reads version %d", hdr->version, hdr->header_size,
                     PRIM_VERSION);
        return NULL;
    }
    if (hdr->layout.kind != (uint32_t)kind) {
        PyErr_Format(PyExc_ValueError, "buffer holds primitive %s, not %s",
                     hdr->layout.kind < PRIM_COUNT ? prim_names[hdr->layout.kind] : "?",
                     prim_names[kind]);
        return NULL;
    }
    if (nworkers >= 0 && hdr->layout.nworkers != (uint32_t)nworkers) {
        PyErr_Format(PyExc_ValueError, "buffer was initialised for %u workers, not %d",
                     hdr->layout.nworkers, nworkers);
        return NULL;
    }
    /* Recompute the layout from its inputs: no offset of the header is
     * trusted unless it is the one this build would have written. */
    if (hdr->layout.nworkers < 1 || hdr->layout.nworkers > MAX_WORKERS
        || hdr->layout.nslots < (uint32_t)rseq_possible_cpus()) {
        PyErr_Format(PyExc_ValueError, "primitive state for %u workers and %u CPUs: "
                     "this machine has %d possible CPUs", hdr->layout.nworkers,
                     hdr->layout.nslots, rseq_possible_cpus());
        return NULL;
    }
    layout_compute(&want, (enum prim_kind)kind, hdr->layout.nworkers, hdr->layout.nslots,
                   &defaults);
    if (memcmp(&want, &hdr->layout, sizeof(want)) != 0) {
        PyErr_SetString(PyExc_ValueError, "primitive state layout is corrupt");
        return NULL;
    }
    if ((uint64_t)view->len < want.size) {
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes: the state needs %llu",
                     view->len, (unsigned long long)want.size);
        return NULL;
    }
    return hdr;
}

/* ---------------------------------------------------------------------------
 * Python functions
 * ------------------------------------------------------------------------- */

const char rseq_py_primitive_size_doc[] =
    "primitive_size(name, nworkers, /)\n--\n\n"
    "Bytes of shared state primitive_init() needs for `name` and `nworkers`\n"
    "workers: per-index cells for every possible CPU in two lanes (rseq and\n"
    "fallback), plus nodes (list) or per-worker tallies (store_store, memcpy).";

PyObject *rseq_py_primitive_size(PyObject *module, PyObject *args)
{
    (void)module;
    const char *name;
    int nworkers, kind;
    struct prim_layout lay;

    if (!PyArg_ParseTuple(args, "si:primitive_size", &name, &nworkers))
        return NULL;
    if ((kind = kind_from_name(name)) < 0 || check_nworkers(nworkers) < 0)
        return NULL;
    layout_compute(&lay, (enum prim_kind)kind, (uint32_t)nworkers,
                   (uint32_t)rseq_possible_cpus(), &defaults);
    return PyLong_FromUnsignedLongLong(lay.size);
}

const char rseq_py_primitive_init_doc[] =
    "primitive_init(name, buffer, nworkers, /)\n--\n\n"
    "Lay out the state of `name` for `nworkers` workers in the writable,\n"
    "64-byte aligned `buffer` (an anonymous mmap: forked workers share it).\n"
    "Raises ValueError if the buffer is smaller than primitive_size().";

PyObject *rseq_py_primitive_init(PyObject *module, PyObject *args)
{
    (void)module;
    const char *name;
    Py_buffer view;
    int nworkers, kind;
    struct prim_layout lay;

    if (!PyArg_ParseTuple(args, "sw*i:primitive_init", &name, &view, &nworkers))
        return NULL;
    if ((kind = kind_from_name(name)) < 0 || check_nworkers(nworkers) < 0)
        goto fail;
    layout_compute(&lay, (enum prim_kind)kind, (uint32_t)nworkers,
                   (uint32_t)rseq_possible_cpus(), &defaults);
    if ((uintptr_t)view.buf % CACHELINE != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer is not 64-byte aligned (use an mmap)");
        goto fail;
    }
    if ((uint64_t)view.len < lay.size) {
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes: %s for %d workers needs %llu",
                     view.len, name, nworkers, (unsigned long long)lay.size);
        goto fail;
    }
    state_init(view.buf, &lay, 0);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&view);
    return NULL;
}

const char rseq_py_primitive_run_doc[] =
    "primitive_run(name, buffer, worker, reps, index, /)\n--\n\n"
    "Worker number `worker` performs `reps` operations of `name` on the state\n"
    "in `buffer`, indexed by `index` ('cpu' or 'mm_cid'), with the GIL\n"
    "released.  Each operation retries its sequence until it commits, counting\n"
    "aborts in aborts().  A thread without an rseq area uses the fallback\n"
    "primitives on their own lane.  Raises Unsupported for 'mm_cid' when the\n"
    "thread's area does not cover mm_cid.";

PyObject *rseq_py_primitive_run(PyObject *module, PyObject *args)
{
    rseq_module_state *st = PyModule_GetState(module);
    const char *name, *index;
    Py_buffer view;
    int worker, kind;
    long long reps;
    struct worker w;
    struct rseq_abi *area;

    if (!PyArg_ParseTuple(args, "sw*iLs:primitive_run", &name, &view, &worker, &reps, &index))
        return NULL;
    memset(&w, 0, sizeof(w));
    if ((kind = kind_from_name(name)) < 0)
        goto fail;
    if (strcmp(index, "cpu") == 0 || strcmp(index, "cpu_id") == 0) {
        w.mode = RSEQ_INDEX_CPU_ID;
    } else if (strcmp(index, "mm_cid") == 0) {
        w.mode = RSEQ_INDEX_MM_CID;
    } else {
        PyErr_Format(PyExc_ValueError, "index %s: 'cpu' or 'mm_cid'", index);
        goto fail;
    }
    if (reps < 0 || reps > MAX_REPS) {
        PyErr_Format(PyExc_ValueError, "reps %lld: must be 0..%lld", reps, MAX_REPS);
        goto fail;
    }
    if (!(w.hdr = state_open(&view, kind, -1)))
        goto fail;
    if (worker < 0 || (uint32_t)worker >= w.hdr->layout.nworkers) {
        PyErr_Format(PyExc_ValueError, "worker %d: the state has workers 0..%u", worker,
                     w.hdr->layout.nworkers - 1);
        goto fail;
    }
    /* With the GIL: the area may be registered lazily. */
    area = counter_thread_area();
    if (w.mode == RSEQ_INDEX_MM_CID
        && (!area || counter_thread_area_size() < RSEQ_END_MM_CID)) {
        PyErr_SetString(st->Unsupported,
                        "mm_cid is not covered by this thread's rseq area (no area, or a "
                        "registration shorter than 28 bytes, as glibc's)");
        goto fail;
    }
    w.base = view.buf;
    w.lay = &w.hdr->layout;
    w.id = (uint32_t)worker;
    w.rs = RSEQ_PERCPU_USE_CS(area) ? area : NULL;
    w.lane = w.rs ? LANE_RSEQ : LANE_FALLBACK;
    Py_BEGIN_ALLOW_THREADS
    worker_run(&w, (long)reps);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&view);
    return NULL;
}

const char rseq_py_primitive_check_doc[] =
    "primitive_check(name, buffer, nworkers, reps, /)\n--\n\n"
    "(expected, got) after every worker ran `reps` operations: equal when the\n"
    "run was exact.  cbne, add: operations vs the sum of the cells; bov:\n"
    "operations vs those of cells whose value matches their adds and drains;\n"
    "list: nodes vs distinct nodes found on the lists; store_store, memcpy:\n"
    "operations vs those whose committed entry was found intact exactly once.\n"
    "got is lowered by one per violation the workers saw while running.";

PyObject *rseq_py_primitive_check(PyObject *module, PyObject *args)
{
    (void)module;
    const char *name;
    Py_buffer view;
    int nworkers, kind;
    long long reps;
    struct prim_header *hdr;
    int64_t expected, got = 0;

    if (!PyArg_ParseTuple(args, "sw*iL:primitive_check", &name, &view, &nworkers, &reps))
        return NULL;
    if ((kind = kind_from_name(name)) < 0 || check_nworkers(nworkers) < 0)
        goto fail;
    if (reps < 0 || reps > MAX_REPS) {
        PyErr_Format(PyExc_ValueError, "reps %lld: must be 0..%lld", reps, MAX_REPS);
        goto fail;
    }
    if (!(hdr = state_open(&view, kind, nworkers)))
        goto fail;
    got = workload_check(view.buf, &hdr->layout, reps, &expected);
    PyBuffer_Release(&view);
    return Py_BuildValue("(LL)", (long long)expected, (long long)got);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

int rseq_primitive_add_constants(PyObject *module)
{
    PyObject *names = PyTuple_New(PRIM_COUNT);

    if (!names)
        return -1;
    for (int k = 0; k < PRIM_COUNT; k++) {
        PyObject *s = PyUnicode_FromString(prim_names[k]);
        if (!s) {
            Py_DECREF(names);
            return -1;
        }
        PyTuple_SET_ITEM(names, k, s);
    }
    if (PyModule_AddObject(module, "PRIMITIVES", names) < 0) {
        Py_DECREF(names);
        return -1;
    }
    return 0;
}
