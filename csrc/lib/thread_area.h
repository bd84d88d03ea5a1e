/*
 * thread_area.h - how the counter and arena code find the calling thread's
 * rseq area.
 *
 * The release module rseq._core owns registration (registration.c) and reads
 * the area from its initial-exec TLS pointer: one load on the fast path.
 * The test-build module rseq._inject (RSEQ_CAPI_CLIENT) has no registration
 * code of its own: it is a client of rseq._core's C API like any other
 * extension, so the two modules never register the same thread twice.
 */
#ifndef RSEQ_PY_THREAD_AREA_H
#define RSEQ_PY_THREAD_AREA_H

#include "rseq/abi.h"

#ifdef RSEQ_CAPI_CLIENT
#include "rseq/capi.h"

extern const struct rseq_capi *rseq_client_api;

static inline struct rseq_abi *counter_thread_area(void)
{
    return rseq_client_api->thread_area();
}

static inline uint32_t counter_thread_area_size(void)
{
    return rseq_client_api->thread_area_size();
}

/* The area was found with cpu_id < 0 (registration lost): thread_area()
 * records that and moves the thread to the fallback. */
static inline void counter_thread_area_recheck(void)
{
    (void)rseq_client_api->thread_area();
}
#else
#include "registration.h"

static inline struct rseq_abi *counter_thread_area(void)
{
    struct rseq_abi *rs = rseq_tls_area;
    if (__builtin_expect(rs != NULL, 1))
        return rs;
    return rseq_thread_area_checked(); /* registers lazily */
}

static inline void counter_thread_area_recheck(void)
{
    (void)rseq_thread_area_checked();
}

static inline uint32_t counter_thread_area_size(void)
{
    struct rseq_thread *t = rseq_thread_get();
    return t && t->area ? t->usable_size : 0;
}
#endif

int rseq_possible_cpus(void);

#endif /* RSEQ_PY_THREAD_AREA_H */
