/*
 * inspect.c - read another thread's rseq registration with
 * PTRACE_GET_RSEQ_CONFIGURATION (Linux 5.13).
 *
 * The thread is seized (PTRACE_SEIZE does not stop it or send a signal),
 * interrupted into a group-stop-free ptrace stop, asked, and detached at
 * once: it never sees a signal and resumes where it was.  A signal that
 * arrives meanwhile is passed back on detach, not lost.
 *
 * The wait for the stop has no timeout on purpose: a thread in
 * uninterruptible sleep (a vfork parent, state D) only stops when it wakes,
 * and a tracer that gave up before then could not detach it (PTRACE_DETACH
 * needs a stopped tracee), leaving it to stop for good on waking.  The bound
 * lives one level up: rseq._inspect calls this on a helper thread and waits
 * for it with a timeout; the helper finishes the read and detaches when the
 * thread wakes, or the kernel detaches it when the process exits.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/wait.h>

#include "core.h"
#include "rseq/abi.h"

const char *errno_name(int err)
{
    static const struct { int err; const char *name; } names[] = {
        {EPERM, "EPERM"}, {ENOENT, "ENOENT"}, {ESRCH, "ESRCH"}, {EINTR, "EINTR"},
        {EIO, "EIO"}, {ENXIO, "ENXIO"}, {E2BIG, "E2BIG"}, {EBADF, "EBADF"},
        {EAGAIN, "EAGAIN"}, {ENOMEM, "ENOMEM"}, {EACCES, "EACCES"},
        {EFAULT, "EFAULT"}, {EBUSY, "EBUSY"}, {EEXIST, "EEXIST"},
        {EINVAL, "EINVAL"}, {ENOSPC, "ENOSPC"}, {ERANGE, "ERANGE"},
        {ENOSYS, "ENOSYS"}, {EOVERFLOW, "EOVERFLOW"}, {EOPNOTSUPP, "EOPNOTSUPP"},
        {524, "ENOTSUPP"}, /* kernel-internal, seen by prctl on 7.0 */
    };
    static __thread char buf[32];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (names[i].err == err)
            return names[i].name;
    snprintf(buf, sizeof buf, "errno %d", err);
    return buf;
}

/* 0 and *conf filled, or -errno with *failed naming the call. */
static int read_configuration(pid_t tid, struct rseq_ptrace_configuration *conf,
                              const char **failed)
{
    int status, ret = 0, resume_signal = 0;
    if (ptrace(PTRACE_SEIZE, tid, NULL, NULL) != 0) {
        *failed = "ptrace(PTRACE_SEIZE)";
        return -errno;
    }
    if (ptrace(PTRACE_INTERRUPT, tid, NULL, NULL) != 0) {
        *failed = "ptrace(PTRACE_INTERRUPT)";
        ret = -errno;
        goto detach;
    }
    pid_t waited;
    do
        waited = waitpid(tid, &status, __WALL);
    while (waited < 0 && errno == EINTR);
    if (waited < 0) {
        *failed = "waitpid";
        ret = -errno;
        goto detach;
    }
    /* A signal pending when the thread was interrupted is reported first,
     * as a signal-delivery-stop (event 0) rather than the interrupt's
     * PTRACE_EVENT_STOP.  Detaching with 0 would discard it: hand it back
     * so the inspected process never loses a signal. */
    if (WIFSTOPPED(status) && (status >> 16) == 0)
        resume_signal = WSTOPSIG(status);
    memset(conf, 0, sizeof *conf);
    long n = ptrace((enum __ptrace_request)RSEQ_PTRACE_GET_CONFIGURATION, tid,
                    (void *)sizeof *conf, conf);
    if (n < 0) {
        /* EIO: the kernel does not know the request (before 5.13). */
        *failed = "ptrace(PTRACE_GET_RSEQ_CONFIGURATION)";
        ret = -errno;
    }
detach:
    ptrace(PTRACE_DETACH, tid, NULL, (void *)(long)resume_signal);
    return ret;
}

const char rseq_py_thread_configuration_doc[] =
"thread_configuration($module, tid, /)\n--\n\n"
"(address, size, signature, flags) of thread `tid`'s rseq registration, read\n"
"with PTRACE_GET_RSEQ_CONFIGURATION; address 0 and size 0 when the thread has\n"
"none.  Raises OSError naming the failing call (ESRCH: no such thread; EPERM:\n"
"not allowed to trace it; EIO: the kernel lacks the request).  Blocks until\n"
"the thread reaches a ptrace stop, that is until a thread in uninterruptible\n"
"sleep wakes: rseq._inspect.inspect_process() bounds the wait.";

PyObject *rseq_py_thread_configuration(PyObject *module, PyObject *arg)
{
    (void)module;
    long tid = PyLong_AsLong(arg);
    if (tid == -1 && PyErr_Occurred())
        return NULL;
    if (tid <= 0 || tid > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "not a thread id: %ld", tid);
        return NULL;
    }
    struct rseq_ptrace_configuration conf;
    const char *failed = NULL;
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = read_configuration((pid_t)tid, &conf, &failed);
    Py_END_ALLOW_THREADS
    if (ret < 0) {
        PyObject *msg = PyUnicode_FromFormat("%s on thread %ld: %s (%s)", failed, tid,
                                             strerror(-ret), errno_name(-ret));
        if (msg) {
            PyObject *exc_args = Py_BuildValue("(iN)", -ret, msg);
            if (exc_args) {
                PyErr_SetObject(PyExc_OSError, exc_args);
                Py_DECREF(exc_args);
            }
        }
        return NULL;
    }
    return Py_BuildValue("(KIII)", (unsigned long long)conf.rseq_abi_pointer,
                         conf.rseq_abi_size, conf.signature, conf.flags);
}
