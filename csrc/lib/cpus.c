/*
 * cpus.c - the number of possible CPU ids.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "thread_area.h"

static int parse_possible(void)
{
    /* "0-1" or "0,2-5": the highest listed CPU + 1 is the range cpu_id and
     * mm_cid can take, however many CPUs are online now. */
    FILE *f = fopen("/sys/devices/system/cpu/possible", "re");
    int highest = -1;
    if (f) {
        char buf[256];
        if (fgets(buf, sizeof buf, f)) {
            char *p = buf;
            while (*p) {
                char *end;
                long v = strtol(p, &end, 10);
                if (end == p)
                    break;
                if (v > highest)
                    highest = (int)v;
                p = end;
                if (*p == '-' || *p == ',')
                    p++;
            }
        }
        fclose(f);
    }
    if (highest < 0) {
        long n = sysconf(_SC_NPROCESSORS_CONF);
        return n > 0 ? (int)n : 1;
    }
    return highest + 1;
}

int rseq_possible_cpus(void)
{
    static int cached; /* a benign race: every thread computes the same */
    int n = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (!n) {
        n = parse_possible();
        __atomic_store_n(&cached, n, __ATOMIC_RELAXED);
    }
    return n;
}
