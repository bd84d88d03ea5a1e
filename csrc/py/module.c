/*
 * module.c - the rseq._core extension module: method table, exceptions,
 * module state and the C API capsule.  The real work is in the topic files
 * (registration.c, ...); this file only binds them to Python.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <sys/prctl.h>

#include "core.h"
#include "counter_type.h"
#include "metrics_type.h"
#include "percpu.h"
#include "registration.h"
#include "ring_type.h"
#include "thread_area.h"
#include "rseq/capi.h"

/* ------------------------------------------------------------------------
 * Module state
 * ------------------------------------------------------------------------ */

static inline rseq_module_state *get_state(PyObject *module)
{
    return (rseq_module_state *)PyModule_GetState(module);
}

/* ------------------------------------------------------------------------
 * Fast reads
 * ------------------------------------------------------------------------ */

PyDoc_STRVAR(cpu_doc,
"cpu($module, /)\n--\n\n"
"The CPU the calling thread runs on: one load from the thread's rseq area,\n"
"else sched_getcpu(), else the getcpu system call.  The answer may be stale\n"
"as soon as it is returned: the thread may migrate at any instant.");

static PyObject *py_cpu(PyObject *module, PyObject *Py_UNUSED(unused))
{
    int cpu = rseq_current_cpu();
    if (__builtin_expect(cpu >= 0, 1))
        return PyLong_FromLong(cpu);
    return PyErr_SetFromErrno(PyExc_OSError);
    (void)module;
}

PyDoc_STRVAR(node_doc,
"node($module, /)\n--\n\n"
"The NUMA node of the calling thread's CPU: the rseq node_id field where\n"
"the registration covers it, else getcpu() (vDSO), else the system call.");

static PyObject *py_node(PyObject *module, PyObject *Py_UNUSED(unused))
{
    (void)module;
    struct rseq_abi *area = rseq_thread_area_checked();
    struct rseq_thread *t = rseq_thread_peek();
    if (area && t->usable_size >= RSEQ_END_NODE_ID)
        return PyLong_FromLong((long)__atomic_load_n(&area->node_id, __ATOMIC_RELAXED));
    int node = rseq_fallback_node();
    if (node < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(node);
}

PyDoc_STRVAR(mm_cid_doc,
"mm_cid($module, /)\n--\n\n"
"The calling thread's concurrency ID: a small per-process index, below both\n"
"the number of threads and the number of CPUs, that no other running thread\n"
"of the process has at this instant (Linux 6.3).  Raises rseq.Unsupported\n"
"when the registration does not cover the field: glibc's 20-byte\n"
"registration does not (run with GLIBC_TUNABLES=glibc.pthread.rseq=0 to let\n"
"rseq register a full area), nor does a kernel older than 6.3.");

static PyObject *py_mm_cid(PyObject *module, PyObject *Py_UNUSED(unused))
{
    /* Checked: after the registration ends, mm_cid reads 0 forever. */
    struct rseq_abi *area = rseq_thread_area_checked();
    struct rseq_thread *t = rseq_thread_peek();
    if (area && t->usable_size >= RSEQ_END_MM_CID)
        return PyLong_FromLong((long)__atomic_load_n(&area->mm_cid, __ATOMIC_RELAXED));
    rseq_module_state *st = get_state(module);
    if (!t || !area)
        PyErr_Format(st->Unsupported,
                     "mm_cid is not available: this thread has no rseq area (%s)",
                     t ? rseq_fallback_reason(t) : "out of memory");
    else
        PyErr_Format(st->Unsupported,
                     "mm_cid is not available: the %s registration makes %u bytes "
                     "usable and mm_cid needs %d (kernel feature size %lu)%s",
                     rseq_owner_name(t->owner), t->usable_size, RSEQ_END_MM_CID,
                     rseq_process_get()->feature_size,
                     t->owner == RSEQ_OWNER_GLIBC
                         ? "; set GLIBC_TUNABLES=glibc.pthread.rseq=0 to let rseq register a full area"
                         : "");
    return NULL;
}

/* ------------------------------------------------------------------------
 * Registration
 * ------------------------------------------------------------------------ */

static PyObject *raise_registration_error(rseq_module_state *st, int err, const char *what)
{
    PyObject *args = Py_BuildValue("(is)", err, what);
    if (args) {
        PyErr_SetObject(st->RegistrationError, args);
        Py_DECREF(args);
    }
    return NULL;
}

PyDoc_STRVAR(register_doc,
"register($module, /)\n--\n\n"
"Take a reference on the calling thread's rseq registration, registering an\n"
"area now if nobody has.  Returns the thread's reference count.  The\n"
"registration lives until every register() has been matched by an\n"
"unregister() (or the thread exits); one that a read made lazily holds a\n"
"reference of its own and lives until the thread exits.  Raises\n"
"rseq.RegistrationError when the thread cannot be registered (errno says\n"
"why) and OverflowError when the count would pass 2**32 - 1.");

static PyObject *py_register(PyObject *module, PyObject *Py_UNUSED(unused))
{
    rseq_module_state *st = get_state(module);
    int ret = rseq_thread_register();
    if (ret == -EOVERFLOW) {
        PyErr_SetString(PyExc_OverflowError,
                        "rseq.register(): the thread's reference count is at its "
                        "limit (2**32 - 1)");
        return NULL;
    }
    if (ret == -ENOMEM)
        return PyErr_NoMemory();
    if (ret < 0) {
        struct rseq_thread *t = rseq_thread_peek();
        return raise_registration_error(st, -ret,
            t ? rseq_fallback_reason(t) : strerror(-ret));
    }
    return PyLong_FromUnsignedLong(rseq_thread_peek()->refcount);
}

PyDoc_STRVAR(unregister_doc,
"unregister($module, /)\n--\n\n"
"Drop a reference taken by register().  Returns True when this call released\n"
"the kernel registration (the last reference to an area rseq registered),\n"
"False otherwise.  A registration owned by glibc or librseq is never\n"
"touched: the call only drops the reference, and when there is none to\n"
"drop it is a no-op that says so with rseq.NotOwnedWarning.\n"
"Raises rseq.RegistrationError (EINVAL) for an unregister() with no\n"
"register() outstanding.");

static PyObject *py_unregister(PyObject *module, PyObject *Py_UNUSED(unused))
{
    rseq_module_state *st = get_state(module);
    int not_owned = 0;
    int ret = rseq_thread_unregister(&not_owned);
    if (ret == -ENOMEM)
        return PyErr_NoMemory();
    if (ret == -EINVAL)
        return raise_registration_error(st, EINVAL,
            "rseq.unregister() without a matching rseq.register()");
    if (ret < 0)
        return raise_registration_error(st, -ret, "rseq(2) RSEQ_FLAG_UNREGISTER failed");
    if (not_owned) {
        struct rseq_thread *t = rseq_thread_peek();
        const char *owner = t && t->area ? rseq_owner_name(t->owner) : NULL;
        int warned = owner
            ? PyErr_WarnFormat(st->NotOwnedWarning, 1,
                  "this thread's rseq registration is owned by %s; rseq.unregister() "
                  "left it in place", owner)
            : PyErr_WarnFormat(st->NotOwnedWarning, 1,
                  "this thread has no rseq registration (%s); rseq.unregister() "
                  "had nothing to release",
                  t && rseq_fallback_reason(t) ? rseq_fallback_reason(t) : "none yet");
        if (warned < 0)
            return NULL;
    }
    return PyBool_FromLong(ret == 1);
}

PyDoc_STRVAR(registration_count_doc,
"registration_count($module, /)\n--\n\n"
"The calling thread's register() reference count.");

static PyObject *py_registration_count(PyObject *module, PyObject *Py_UNUSED(unused))
{
    (void)module;
    struct rseq_thread *t = rseq_thread_peek();
    return PyLong_FromUnsignedLong(t ? t->refcount : 0);
}

/* ------------------------------------------------------------------------
 * Feature discovery
 * ------------------------------------------------------------------------ */

/* struct rseq's fields with their end offsets, from the list in rseq/abi.h. */
#define FIELD_END(name, offset, size) {#name, (offset) + (size)},
static const struct { const char *name; int end; } field_table[] = {
    RSEQ_ABI_FIELDS(FIELD_END)
};
#undef FIELD_END

static int dict_set(PyObject *d, const char *key, PyObject *value)
{
    if (!value)
        return -1;
    int ret = PyDict_SetItemString(d, key, value);
    Py_DECREF(value);
    return ret;
}

static PyObject *none_or_string(const char *s)
{
    if (s)
        return PyUnicode_FromString(s);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(info_dict_doc,
"info_dict($module, /)\n--\n\n"
"The facts behind rseq.info(), as a dict, for the calling thread.");

static PyObject *py_info_dict(PyObject *module, PyObject *Py_UNUSED(unused))
{
    (void)module;
    const struct rseq_process *p = rseq_process_get();
    (void)rseq_thread_area_checked(); /* a lost registration shows in fallback */
    struct rseq_thread *t = rseq_thread_peek();
    if (!t)
        return PyErr_NoMemory();
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    PyObject *fields = PyList_New(0);
    if (!fields)
        goto fail;
    for (size_t i = 0; t->area && i < sizeof field_table / sizeof field_table[0]; i++) {
        if ((uint32_t)field_table[i].end > t->usable_size)
            continue;
        PyObject *name = PyUnicode_FromString(field_table[i].name);
        if (!name || PyList_Append(fields, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(fields);
            goto fail;
        }
        Py_DECREF(name);
    }
    if (dict_set(d, "fields", PyList_AsTuple(fields)) < 0) {
        Py_DECREF(fields);
        goto fail;
    }
    Py_DECREF(fields);

    uint32_t flags = t->area ? __atomic_load_n(&t->area->flags, __ATOMIC_RELAXED) : 0;
    /* PR_RSEQ_SLICE_EXTENSION GET: a 7.0 kernel answers the thread's state;
     * older kernels answer EINVAL.  Reported as an errno name or "enabled". */
    int slice_prctl = prctl(RSEQ_PR_SLICE_EXTENSION, RSEQ_PR_SLICE_EXTENSION_GET, 0, 0, 0);
    int slice_errno = slice_prctl < 0 ? errno : 0;

    if (dict_set(d, "kernel", PyBool_FromLong(p->kernel == 1)) < 0
        || dict_set(d, "kernel_probe", PyUnicode_FromString(
               p->probe_errno == ENOSYS ? "ENOSYS"
               : p->probe_errno == EPERM ? "EPERM" : "ok")) < 0
        || dict_set(d, "feature_size", PyLong_FromUnsignedLong(p->feature_size)) < 0
        || dict_set(d, "alignment", PyLong_FromUnsignedLong(p->alignment)) < 0
        || dict_set(d, "owner", none_or_string(t->area ? rseq_owner_name(t->owner) : NULL)) < 0
        || dict_set(d, "process_owner", none_or_string(rseq_owner_name(p->owner))) < 0
        || dict_set(d, "registered_size", PyLong_FromUnsignedLong(t->area ? t->registered_size : 0)) < 0
        || dict_set(d, "usable_size", PyLong_FromUnsignedLong(t->area ? t->usable_size : 0)) < 0
        || dict_set(d, "area_address", t->area ? PyLong_FromVoidPtr(t->area) : Py_NewRef(Py_None)) < 0
        || dict_set(d, "signature", PyLong_FromUnsignedLong(RSEQ_SIG)) < 0
        || dict_set(d, "possible_cpus", PyLong_FromLong(p->possible_cpus)) < 0
        || dict_set(d, "fallback", none_or_string(rseq_fallback_reason(t))) < 0
        || dict_set(d, "fallback_errno", t->fallback_errno
                        ? PyUnicode_FromString(errno_name(t->fallback_errno))
                        : Py_NewRef(Py_None)) < 0
        || dict_set(d, "registration_count", PyLong_FromUnsignedLong(t->refcount)) < 0
        || dict_set(d, "slice_extension", PyBool_FromLong(
               (flags >> RSEQ_FLAGS_SLICE_EXT_AVAILABLE_BIT) & 1)) < 0
        || dict_set(d, "slice_extension_enabled", PyBool_FromLong(
               (flags >> RSEQ_FLAGS_SLICE_EXT_ENABLED_BIT) & 1)) < 0
        || dict_set(d, "slice_extension_prctl", PyUnicode_FromString(
               slice_errno ? errno_name(slice_errno)
                           : slice_prctl ? "enabled" : "disabled")) < 0
        || dict_set(d, "arch", PyUnicode_FromString(RSEQ_ARCH_NAME)) < 0
        || dict_set(d, "critical_sections", PyBool_FromLong(RSEQ_ARCH_HAS_CS && t->area)) < 0)
        goto fail;
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

/* ------------------------------------------------------------------------
 * C API capsule
 * ------------------------------------------------------------------------ */

static struct rseq_abi *capi_thread_area(void)
{
    return rseq_thread_area_checked();
}

static uint32_t capi_thread_area_size(void)
{
    return rseq_thread_area_checked() ? rseq_thread_peek()->usable_size : 0;
}

static int capi_register(void) { return rseq_thread_register(); }

static int capi_unregister(void)
{
    int not_owned;
    return rseq_thread_unregister(&not_owned);
}

/* The primitives for other extensions: the same inline sequences behind
 * function pointers (a call costs about a nanosecond).  With area == NULL (a
 * thread on the fallback) each takes its atomic fallback, whose owner words
 * (pop, store_store, memcpy) are process-local: the mixing rule of
 * percpu_fallback.h applies to the caller's data. */
static int capi_current_index(struct rseq_abi *rs, int mode)
{
    return rseq_percpu_index(rs, (enum rseq_index_mode)mode);
}

/* Each entry point is the rseq_percpu_* dispatch of percpu.h: the sequence
 * when the thread has an area, else the fallback with a process-local owner
 * (NULL).  The int mode of the C API is the enum of percpu.h. */
#define CAPI_MODE ((enum rseq_index_mode)mode)

static int capi_load_cbne_store(struct rseq_abi *rs, int mode, intptr_t *v, intptr_t expect,
                                intptr_t newv, int cpu)
{
    return rseq_percpu_load_cbne_store(rs, CAPI_MODE, v, expect, newv, cpu);
}

static int capi_load_add_store(struct rseq_abi *rs, int mode, intptr_t *v, intptr_t count,
                               int cpu)
{
    return rseq_percpu_load_add_store(rs, CAPI_MODE, v, count, cpu);
}

static int capi_load_add_bov_store(struct rseq_abi *rs, int mode, intptr_t *v, intptr_t count,
                                   int cpu)
{
    return rseq_percpu_load_add_bov_store(rs, CAPI_MODE, v, count, cpu);
}

static int capi_load_cbeq_store_load_store(struct rseq_abi *rs, int mode, intptr_t *v,
                                           intptr_t expectnot, ptrdiff_t next_offset,
                                           intptr_t *loaded, int cpu)
{
    return rseq_percpu_load_cbeq_store_load_store(rs, CAPI_MODE, v, expectnot, next_offset,
                                                  loaded, NULL, cpu);
}

static int capi_load_cbne_store_store(struct rseq_abi *rs, int mode, intptr_t *v,
                                      intptr_t expect, intptr_t *p2, intptr_t v2,
                                      intptr_t newv, int cpu)
{
    return rseq_percpu_load_cbne_store_store(rs, CAPI_MODE, v, expect, p2, v2, newv, NULL, cpu);
}

static int capi_load_cbne_memcpy_store(struct rseq_abi *rs, int mode, intptr_t *v,
                                       intptr_t expect, void *dst, const void *src, size_t len,
                                       intptr_t newv, int cpu)
{
    return rseq_percpu_load_cbne_memcpy_store(rs, CAPI_MODE, v, expect, dst, src, len, newv,
                                              NULL, cpu);
}

#undef CAPI_MODE

static const struct rseq_capi capi = {
    .size = sizeof(struct rseq_capi),
    .version = RSEQ_CAPI_VERSION,
    .signature = RSEQ_SIG,
    .thread_area = capi_thread_area,
    .thread_area_size = capi_thread_area_size,
    .current_cpu = rseq_current_cpu,  /* the area first, as documented */
    .register_thread = capi_register,
    .unregister_thread = capi_unregister,
    .current_index = capi_current_index,
    .load_cbne_store = capi_load_cbne_store,
    .load_add_store = capi_load_add_store,
    .load_add_bov_store = capi_load_add_bov_store,
    .load_cbeq_store_load_store = capi_load_cbeq_store_load_store,
    .load_cbne_store_store = capi_load_cbne_store_store,
    .load_cbne_memcpy_store = capi_load_cbne_memcpy_store,
    .ring_handle = rseq_ring_handle,
    .ring_put = rseq_ring_put,
    .pool_of = rseq_capi_pool_of,
    .pool_alloc = rseq_capi_pool_alloc,
    .pool_free = rseq_capi_pool_free,
    .pool_block = rseq_capi_pool_block,
    .pool_block_size = rseq_capi_pool_block_size,
    .pool_block_count = rseq_capi_pool_block_count,
};

/* ------------------------------------------------------------------------
 * The ABI, exported from rseq/abi.h so that no Python module restates it
 * ------------------------------------------------------------------------ */

/* A tuple of (name, offset, size) per field. */
static PyObject *field_tuple(const char *const *names, const int *offsets, const int *sizes,
                             size_t count)
{
    PyObject *fields = PyTuple_New((Py_ssize_t)count);
    if (!fields)
        return NULL;
    for (size_t i = 0; i < count; i++) {
        PyObject *item = Py_BuildValue("(sii)", names[i], offsets[i], sizes[i]);
        if (!item) {
            Py_DECREF(fields);
            return NULL;
        }
        PyTuple_SET_ITEM(fields, (Py_ssize_t)i, item);
    }
    return fields;
}

#define FIELD_NAME(name, offset, size) #name,
#define FIELD_OFFSET(name, offset, size) offset,
#define FIELD_SIZE(name, offset, size) size,
static const char *const abi_field_names[] = {RSEQ_ABI_FIELDS(FIELD_NAME)};
static const int abi_field_offsets[] = {RSEQ_ABI_FIELDS(FIELD_OFFSET)};
static const int abi_field_sizes[] = {RSEQ_ABI_FIELDS(FIELD_SIZE)};
static const char *const abi_cs_field_names[] = {RSEQ_ABI_CS_FIELDS(FIELD_NAME)};
static const int abi_cs_field_offsets[] = {RSEQ_ABI_CS_FIELDS(FIELD_OFFSET)};
static const int abi_cs_field_sizes[] = {RSEQ_ABI_CS_FIELDS(FIELD_SIZE)};
#undef FIELD_NAME
#undef FIELD_OFFSET
#undef FIELD_SIZE

static const struct { const char *name; long value; } abi_numbers[] = {
    {"ORIG_SIZE", RSEQ_ORIG_SIZE},
    {"ORIG_ALIGN", RSEQ_ORIG_ALIGN},
    {"ORIG_FEATURE_SIZE", RSEQ_ORIG_FEATURE_SIZE},
    {"CS_SIZE", RSEQ_CS_SIZE},
    {"SIGNATURE", RSEQ_SIG},
    {"CPU_ID_UNINITIALIZED", RSEQ_CPU_ID_UNINITIALIZED},
    {"CPU_ID_REGISTRATION_FAILED", RSEQ_CPU_ID_REGISTRATION_FAILED},
    {"FLAG_UNREGISTER", RSEQ_FLAG_UNREGISTER},
    {"FLAG_SLICE_EXT_DEFAULT_ON", RSEQ_FLAG_SLICE_EXT_DEFAULT_ON},
    {"FLAGS_SLICE_EXT_AVAILABLE_BIT", RSEQ_FLAGS_SLICE_EXT_AVAILABLE_BIT},
    {"FLAGS_SLICE_EXT_ENABLED_BIT", RSEQ_FLAGS_SLICE_EXT_ENABLED_BIT},
    {"CS_FLAGS_DEPRECATED", RSEQ_CS_FLAGS_DEPRECATED},
    {"AT_RSEQ_FEATURE_SIZE", RSEQ_AT_FEATURE_SIZE},
    {"AT_RSEQ_ALIGN", RSEQ_AT_ALIGN},
    {"MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ", RSEQ_MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ},
    {"MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ",
     RSEQ_MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ},
    {"MEMBARRIER_CMD_FLAG_CPU", RSEQ_MEMBARRIER_CMD_FLAG_CPU},
    {"PTRACE_GET_RSEQ_CONFIGURATION", RSEQ_PTRACE_GET_CONFIGURATION},
    {"PR_RSEQ_SLICE_EXTENSION", RSEQ_PR_SLICE_EXTENSION},
    {"PR_RSEQ_SLICE_EXTENSION_GET", RSEQ_PR_SLICE_EXTENSION_GET},
    {"PR_RSEQ_SLICE_EXTENSION_SET", RSEQ_PR_SLICE_EXTENSION_SET},
    {"PR_RSEQ_SLICE_EXTENSION_ENABLE", RSEQ_PR_SLICE_EXTENSION_ENABLE},
};

/* The system calls Python uses, numbered for the architecture of this build;
 * one the headers do not define is left out (the caller falls back). */
static const struct { const char *name; long value; } abi_syscalls[] = {
#ifdef RSEQ_SYS_RSEQ
    {"rseq", RSEQ_SYS_RSEQ},
#endif
#ifdef SYS_membarrier
    {"membarrier", SYS_membarrier},
#endif
#ifdef SYS_getcpu
    {"getcpu", SYS_getcpu},
#endif
#ifdef SYS_gettid
    {"gettid", SYS_gettid},
#endif
#ifdef SYS_tgkill
    {"tgkill", SYS_tgkill},
#endif
#ifdef SYS_arch_prctl
    {"arch_prctl", SYS_arch_prctl},
#endif
};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* PyModule_Add() of 3.13: adds `value` (a new reference, or NULL with an
 * exception) and always consumes it. */
static int add_owned(PyObject *module, const char *name, PyObject *value)
{
    if (!value)
        return -1;
    int ret = PyModule_AddObjectRef(module, name, value);
    Py_DECREF(value);
    return ret;
}

static int add_abi_constants(PyObject *module)
{
    PyObject *numbers = PyDict_New(), *syscalls = PyDict_New();
    int ret = -1;

    if (!numbers || !syscalls)
        goto done;
    for (size_t i = 0; i < COUNT(abi_numbers); i++)
        if (dict_set(numbers, abi_numbers[i].name, PyLong_FromLong(abi_numbers[i].value)) < 0)
            goto done;
    for (size_t i = 0; i < COUNT(abi_syscalls); i++)
        if (dict_set(syscalls, abi_syscalls[i].name,
                     PyLong_FromLong(abi_syscalls[i].value)) < 0)
            goto done;
    if (PyModule_AddObjectRef(module, "ABI", numbers) < 0
        || PyModule_AddObjectRef(module, "SYSCALLS", syscalls) < 0
        || add_owned(module, "ABI_FIELDS",
                        field_tuple(abi_field_names, abi_field_offsets, abi_field_sizes,
                                    COUNT(abi_field_names))) < 0
        || add_owned(module, "ABI_CS_FIELDS",
                        field_tuple(abi_cs_field_names, abi_cs_field_offsets,
                                    abi_cs_field_sizes, COUNT(abi_cs_field_names))) < 0)
        goto done;
    ret = 0;
done:
    Py_XDECREF(numbers);
    Py_XDECREF(syscalls);
    return ret;
}

/* ------------------------------------------------------------------------
 * Module definition
 * ------------------------------------------------------------------------ */

static PyMethodDef module_methods[] = {
    {"cpu", py_cpu, METH_NOARGS, cpu_doc},
    {"node", py_node, METH_NOARGS, node_doc},
    {"mm_cid", py_mm_cid, METH_NOARGS, mm_cid_doc},
    {"register", py_register, METH_NOARGS, register_doc},
    {"unregister", py_unregister, METH_NOARGS, unregister_doc},
    {"registration_count", py_registration_count, METH_NOARGS, registration_count_doc},
    {"info_dict", py_info_dict, METH_NOARGS, info_dict_doc},
    RSEQ_INSPECT_METHODS
    RSEQ_BENCH_METHODS
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(Unsupported_doc,
"A capability this machine, kernel, libc or registration lacks.\n\n"
"The message names the missing layer (kernel, libc, field).");
PyDoc_STRVAR(RseqError_doc, "Base class of the errors raised by rseq.");
PyDoc_STRVAR(RegistrationError_doc,
"rseq(2) registration or unregistration failed; errno says why\n"
"(ENOSYS: no kernel support; EPERM: denied by seccomp; EINVAL/EBUSY:\n"
"another registrant owns the thread).");
PyDoc_STRVAR(NotOwnedWarning_doc,
"rseq.unregister() was asked to end a registration that glibc, librseq or\n"
"another library owns; it was left in place.");

PyDoc_STRVAR(ArenaError_doc, "A shared-memory arena cannot be used as asked.");
PyDoc_STRVAR(ArenaFormatError_doc,
"The file is not a usable rseq arena: not an arena at all, truncated,\n"
"another version or layout, made for another possible-CPU count, or\n"
"corrupt.  Nothing in it was trusted before this was checked.");
PyDoc_STRVAR(ArenaFullError_doc, "Every counter of the arena is in use.");

static int module_exec(PyObject *module)
{
    rseq_module_state *st = get_state(module);
    rseq_process_get();

    st->RseqError = PyErr_NewExceptionWithDoc("rseq.RseqError", RseqError_doc,
                                              PyExc_Exception, NULL);
    if (!st->RseqError)
        return -1;
    st->Unsupported = PyErr_NewExceptionWithDoc("rseq.Unsupported", Unsupported_doc,
                                                st->RseqError, NULL);
    if (!st->Unsupported)
        return -1;
    PyObject *bases = PyTuple_Pack(2, st->RseqError, PyExc_OSError);
    if (!bases)
        return -1;
    st->RegistrationError = PyErr_NewExceptionWithDoc(
        "rseq.RegistrationError", RegistrationError_doc, bases, NULL);
    Py_DECREF(bases);
    if (!st->RegistrationError)
        return -1;
    st->NotOwnedWarning = PyErr_NewExceptionWithDoc(
        "rseq.NotOwnedWarning", NotOwnedWarning_doc, PyExc_RuntimeWarning, NULL);
    if (!st->NotOwnedWarning)
        return -1;
    st->ArenaError = PyErr_NewExceptionWithDoc("rseq.ArenaError", ArenaError_doc,
                                               st->RseqError, NULL);
    if (!st->ArenaError)
        return -1;
    bases = PyTuple_Pack(2, st->ArenaError, PyExc_ValueError);
    if (!bases)
        return -1;
    st->ArenaFormatError = PyErr_NewExceptionWithDoc("rseq.ArenaFormatError",
                                                     ArenaFormatError_doc, bases, NULL);
    Py_DECREF(bases);
    if (!st->ArenaFormatError)
        return -1;
    st->ArenaFullError = PyErr_NewExceptionWithDoc("rseq.ArenaFullError", ArenaFullError_doc,
                                                   st->ArenaError, NULL);
    if (!st->ArenaFullError)
        return -1;
    if (PyModule_AddObjectRef(module, "RseqError", st->RseqError) < 0
        || PyModule_AddObjectRef(module, "Unsupported", st->Unsupported) < 0
        || PyModule_AddObjectRef(module, "RegistrationError", st->RegistrationError) < 0
        || PyModule_AddObjectRef(module, "NotOwnedWarning", st->NotOwnedWarning) < 0
        || PyModule_AddObjectRef(module, "ArenaError", st->ArenaError) < 0
        || PyModule_AddObjectRef(module, "ArenaFormatError", st->ArenaFormatError) < 0
        || PyModule_AddObjectRef(module, "ArenaFullError", st->ArenaFullError) < 0)
        return -1;
    if (rseq_counter_add_types(module) < 0 || rseq_arena_add_types(module) < 0)
        return -1;
    if (rseq_ring_add_types(module) < 0)
        return -1;
    if (rseq_pool_add_types(module) < 0 || rseq_metrics_add_types(module) < 0)
        return -1;

    PyObject *capsule = PyCapsule_New((void *)&capi, RSEQ_CAPI_CAPSULE_NAME, NULL);
    if (!capsule)
        return -1;
    int added = PyModule_AddObjectRef(module, "_C_API", capsule);
    Py_DECREF(capsule);
    if (added < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "SIGNATURE", RSEQ_SIG) < 0
        || PyModule_AddStringConstant(module, "ARCH", RSEQ_ARCH_NAME) < 0
        || PyModule_AddIntConstant(module, "HAS_CRITICAL_SECTIONS", RSEQ_ARCH_HAS_CS) < 0
        || PyModule_AddIntConstant(module, "POSSIBLE_CPUS", rseq_possible_cpus()) < 0
        || add_abi_constants(module) < 0)
        return -1;
    return 0;
}


static PyModuleDef_Slot module_slots[] = RSEQ_MODULE_SLOTS(module_exec);

PyDoc_STRVAR(module_doc, "The C core of rseq: use the rseq package, not this module.");

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rseq._core",
    .m_doc = module_doc,
    .m_size = sizeof(rseq_module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = rseq_state_traverse,
    .m_clear = rseq_state_clear,
    .m_free = rseq_state_free,
};

PyMODINIT_FUNC PyInit__core(void)
{
    return PyModuleDef_Init(&module_def);
}
