/*
 * rseq/capi.h - the C API of the rseq Python package for other extensions.
 *
 *     #include <rseq/capi.h>          (include directory: rseq.get_include())
 *
 *     const struct rseq_capi *api = rseq_capi_import();   (once, with the GIL)
 *     if (!api) return NULL;                              (ImportError is set)
 *     struct rseq_abi *area = api->thread_area();
 *     if (area && api->thread_area_size() >= RSEQ_END_MM_CID) ...
 *
 * The current thread's area, its usable size and the signature come through
 * functions, not fixed TLS offsets: the area may belong to glibc, librseq or
 * this package, and its usable size depends on the kernel and on the owner
 * (the conclusion of the 2020 kernel-TLS discussion).  Registration through
 * register_thread()/unregister_thread() shares the reference count of
 * rseq.register()/rseq.unregister(), so an extension and Python code cannot
 * end each other's registration.
 *
 * The struct only grows: check `size` before using a member added after
 * version 1 (RSEQ_CAPI_HAS(api, member)).  Version 2 added the per-CPU
 * primitives, version 3 the producer side of rseq.Ring, version 4 the pool
 * functions.
 */
#ifndef RSEQ_CAPI_H
#define RSEQ_CAPI_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#include "rseq/abi.h"

#define RSEQ_CAPI_CAPSULE_NAME "rseq._core._C_API"
#define RSEQ_CAPI_VERSION 4

struct rseq_capi_pool; /* opaque: an rseq.Pool's mapping */

enum rseq_capi_index_mode { RSEQ_CAPI_INDEX_CPU_ID = 0, RSEQ_CAPI_INDEX_MM_CID = 1 };

struct rseq_capi {
    uint32_t size;      /* sizeof(struct rseq_capi) as the provider built it */
    uint32_t version;   /* RSEQ_CAPI_VERSION of the provider */
    uint32_t signature; /* the signature every abort handler must carry */
    uint32_t reserved;

    /* The calling thread's rseq area, registering it lazily; NULL when the
     * thread runs on the fallback (no kernel support, denied, or owned by a
     * registrant that does not share its area).  Never write cpu_id_start,
     * cpu_id, flags, node_id or mm_cid. */
    struct rseq_abi *(*thread_area)(void);
    /* Bytes of the area that are usable: min(registered length, kernel
     * feature size); 0 on the fallback.  A field is usable when its
     * RSEQ_END_* offset is <= this. */
    uint32_t (*thread_area_size)(void);
    /* The current CPU: from the area, else sched_getcpu(), else getcpu(2). */
    int (*current_cpu)(void);
    /* Reference-counted registration: 0 or -errno. */
    int (*register_thread)(void);
    /* 1: released the kernel registration; 0: kept (other references, or
     * owned by glibc/librseq); -EINVAL: no register_thread() outstanding. */
    int (*unregister_thread)(void);

    /* Per-CPU primitives (version 2), named after their pseudo-code; each
     * returns 0 committed, 1 compare failed (or overflow), -1 aborted (read
     * the index again and retry).  `area` is thread_area(); `mode` an
     * enum rseq_capi_index_mode; `cpu` the index the caller read with
     * current_index() and derived every address from.  With area == NULL
     * they take the atomic fallback (never -1): words written by sequences
     * and by fallback code must not be the same words at the same time.
     * So do they with an area whose registration was ended behind the
     * package's back (cpu_id < 0), so that a retry loop holding that area
     * ends; thread_area() answers NULL from then on.
     * Stores before the commit are speculative. */
    /* cpu_id_start or mm_cid; sched_getcpu() when area is NULL */
    int (*current_index)(struct rseq_abi *area, int mode);
    /* load v; if (*v != expect) fail; store newv to *v */
    int (*load_cbne_store)(struct rseq_abi *area, int mode, intptr_t *v,
                           intptr_t expect, intptr_t newv, int cpu);
    /* load v; add count; store */
    int (*load_add_store)(struct rseq_abi *area, int mode, intptr_t *v,
                          intptr_t count, int cpu);
    /* load v; add count; if (signed overflow) fail; store */
    int (*load_add_bov_store)(struct rseq_abi *area, int mode, intptr_t *v,
                              intptr_t count, int cpu);
    /* list pop: load h = *v; if (h == expectnot) fail; store h to *loaded;
     * load n = *(h + next_offset); store n to *v */
    int (*load_cbeq_store_load_store)(struct rseq_abi *area, int mode, intptr_t *v,
                                      intptr_t expectnot, ptrdiff_t next_offset,
                                      intptr_t *loaded, int cpu);
    /* load v; if (*v != expect) fail; store v2 to *p2; store newv to *v
     * (list push: p2 = &node->next, v2 = expect, newv = node) */
    int (*load_cbne_store_store)(struct rseq_abi *area, int mode, intptr_t *v,
                                 intptr_t expect, intptr_t *p2, intptr_t v2,
                                 intptr_t newv, int cpu);
    /* load v; if (*v != expect) fail; memcpy(dst, src, len); store newv to *v */
    int (*load_cbne_memcpy_store)(struct rseq_abi *area, int mode, intptr_t *v,
                                  intptr_t expect, void *dst, const void *src,
                                  size_t len, intptr_t newv, int cpu);

    /* rseq.Ring producer (version 3).  ring_handle(ring) takes an rseq.Ring
     * (with the GIL) and returns a handle valid while the caller keeps a
     * reference to that Ring and does not close it; NULL with an exception
     * set if it is not a writable open ring.  ring_put(handle, data, len)
     * may be called without the GIL, from any thread: 1 committed, 0
     * dropped (drop policy, lane full), -EMSGSIZE longer than the ring's
     * max_record, -ENOMEM, -EUCLEAN the ring is corrupt. */
    void *(*ring_handle)(PyObject *ring);
    int (*ring_put)(void *handle, const void *data, size_t len);

    /* Pools (version 4): alloc and free by index in an rseq.Pool.
     * pool_of(pool._map) (with the GIL) returns a handle valid while the
     * rseq.Pool object or its blocks live; NULL with an exception set when
     * the object is not a writable pool map.  The others need no GIL. */
    struct rseq_capi_pool *(*pool_of)(PyObject *pool_map);
    /* A block owned by the calling process: its index; -1 when no block is
     * free (after reclaiming dead processes' blocks); -5 when the pool is
     * corrupt. */
    int64_t (*pool_alloc)(struct rseq_capi_pool *pool);
    /* 0 freed; -2 index out of range; -3 already free (double free); -4
     * owned by another process; -5 corrupt. */
    int (*pool_free)(struct rseq_capi_pool *pool, uint64_t index);
    /* The address of block `index`, NULL if out of range. */
    void *(*pool_block)(struct rseq_capi_pool *pool, uint64_t index);
    /* Block size in bytes and number of blocks. */
    uint64_t (*pool_block_size)(struct rseq_capi_pool *pool);
    uint64_t (*pool_block_count)(struct rseq_capi_pool *pool);
};

#define RSEQ_CAPI_HAS(api, member) \
    ((api)->size >= offsetof(struct rseq_capi, member) + sizeof((api)->member))

static inline const struct rseq_capi *rseq_capi_import(void)
{
    return (const struct rseq_capi *)PyCapsule_Import(RSEQ_CAPI_CAPSULE_NAME, 0);
}

#endif /* RSEQ_CAPI_H */
