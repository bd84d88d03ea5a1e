/*
 * core.h - the umbrella header of the rseq._core topic files: module state,
 * the helpers they share, and the method-table entries each file exports.
 */
#ifndef RSEQ_PY_CORE_H
#define RSEQ_PY_CORE_H

#include <Python.h>

typedef struct {
    PyObject *RseqError;
    PyObject *Unsupported;
    PyObject *RegistrationError;
    PyObject *NotOwnedWarning;
    PyObject *ArenaError;
    PyObject *ArenaFormatError;
    PyObject *ArenaFullError;
    PyObject *ArenaCounter_type;
} rseq_module_state;

#define RSEQ_STATE_MEMBERS(X) \
    X(RseqError) X(Unsupported) X(RegistrationError) X(NotOwnedWarning) \
    X(ArenaError) X(ArenaFormatError) X(ArenaFullError) X(ArenaCounter_type)

/* GC support of the module state, shared by rseq._core and rseq._inject. */
static inline int rseq_state_traverse(PyObject *module, visitproc visit, void *arg)
{
    rseq_module_state *st = PyModule_GetState(module);
#define RSEQ_VISIT(name) Py_VISIT(st->name);
    RSEQ_STATE_MEMBERS(RSEQ_VISIT)
#undef RSEQ_VISIT
    return 0;
}

static inline int rseq_state_clear(PyObject *module)
{
    rseq_module_state *st = PyModule_GetState(module);
#define RSEQ_CLEAR(name) Py_CLEAR(st->name);
    RSEQ_STATE_MEMBERS(RSEQ_CLEAR)
#undef RSEQ_CLEAR
    return 0;
}

static inline void rseq_state_free(void *module) { rseq_state_clear((PyObject *)module); }

/* The slots of both modules.  Free-threaded builds: nothing relies on the
 * GIL (registration state is per thread, process discovery runs under
 * pthread_once, the counter pool has its own lock); one interpreter only,
 * since process-wide registration state cannot be per interpreter. */
#ifdef Py_mod_multiple_interpreters
#define RSEQ_SLOT_INTERPRETERS \
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#else
#define RSEQ_SLOT_INTERPRETERS
#endif
#ifdef Py_mod_gil
#define RSEQ_SLOT_GIL {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#else
#define RSEQ_SLOT_GIL
#endif
#define RSEQ_MODULE_SLOTS(exec) \
    {{Py_mod_exec, (exec)}, RSEQ_SLOT_INTERPRETERS RSEQ_SLOT_GIL {0, NULL}}

/* "EINVAL" for EINVAL; "errno 123" for a value without a name here. */
const char *errno_name(int err);

/* inspect.c: PTRACE_GET_RSEQ_CONFIGURATION of another process's thread. */
PyObject *rseq_py_thread_configuration(PyObject *module, PyObject *arg);
#define RSEQ_INSPECT_METHODS \
    {"thread_configuration", rseq_py_thread_configuration, METH_O, \
     rseq_py_thread_configuration_doc},
extern const char rseq_py_thread_configuration_doc[];

/* bench.c: C-level timings for `python -m rseq bench`. */
PyObject *rseq_py_bench_c(PyObject *module, PyObject *args);
extern const char rseq_py_bench_c_doc[];
#define RSEQ_BENCH_METHODS \
    {"_bench_c", rseq_py_bench_c, METH_VARARGS, rseq_py_bench_c_doc},

/* pool.c: rseq.Pool's _PoolMap and rseq.PoolBlock, and the pool entries of
 * the C API capsule. */
int rseq_pool_add_types(PyObject *module);
struct rseq_capi_pool;
struct rseq_capi_pool *rseq_capi_pool_of(PyObject *pool_map);
int64_t rseq_capi_pool_alloc(struct rseq_capi_pool *pool);
int rseq_capi_pool_free(struct rseq_capi_pool *pool, uint64_t index);
void *rseq_capi_pool_block(struct rseq_capi_pool *pool, uint64_t index);
uint64_t rseq_capi_pool_block_size(struct rseq_capi_pool *pool);
uint64_t rseq_capi_pool_block_count(struct rseq_capi_pool *pool);

#endif /* RSEQ_PY_CORE_H */
