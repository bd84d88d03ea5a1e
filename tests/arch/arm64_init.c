/*
 * arm64_init.c - /init of the initramfs that tests/arch/arm64.sh boots under
 * qemu-system-aarch64 (a real arm64 Linux kernel: user-mode qemu does not
 * implement rseq(2), so it cannot stand in).
 *
 * It checks, in order, and prints one line per fact:
 *   1. the registration facts of this kernel and libc: glibc registered the
 *      thread, with exactly 32 bytes and the signature of arch/aarch64.h
 *      (registering the same area again answers EBUSY only when area, length
 *      and signature all match); no AT_RSEQ_FEATURE_SIZE before Linux 6.3,
 *      so registration.c runs its pre-6.3 paths (usable size 20);
 *   2. counter.h on its own: threads add through the load_add_bov_store
 *      sequence while two threads reset with rseq_arch_cas128 (the
 *      ldaxp/stlxp pair), racing each other: nothing lost, nothing counted
 *      twice, with both 64-bit halves of the baseline in play;
 *   3. that /cases widens every in-sequence injection point that
 *      workload.c's table lists; then every line of /cases: an optional run
 *      of NAME=value words (the environment), then a program and its
 *      arguments (param_test).  A case
 *      passes when it exits 0 with "OK" last; exit 77 is a skip (a
 *      capability missing, printed).  The "aborts=" figures are summed.
 * Then "arm64 result: PASS" or "arm64 result: FAIL", and the VM powers off.
 *
 * Linked dynamically, like the Python extension: registration.c finds
 * glibc's area with dlsym, which answers nothing in a static binary.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "counter.h"
#include "registration.h"
#include "workload.h"

static int failures;

static void check(int ok, const char *what, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void check(int ok, const char *what, const char *fmt, ...)
{
    va_list ap;
    printf("arm64 %s: %s: ", ok ? "ok  " : "FAIL", what);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    if (!ok)
        failures++;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* The kernel opens /dev/console from its built-in initramfs; if that is
 * missing, bring up devtmpfs and open it here. */
static void setup_system(void)
{
    if (fcntl(1, F_GETFD) == -1) {
        mkdir("/dev", 0755);
        mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
        int fd = open("/dev/console", O_RDWR);
        if (fd >= 0) {
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
        }
    }
    mkdir("/proc", 0555);
    mkdir("/sys", 0555);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
}

/* ---------------------------------------------------------------------------
 * 1. Registration facts
 * ------------------------------------------------------------------------- */

/* rseq(2) itself: 0 or -errno (SYS_rseq: the arm64 glibc headers have it). */
static int raw_rseq(void *area, uint32_t length, int flags, uint32_t signature)
{
    return syscall(SYS_rseq, area, length, flags, signature) == 0 ? 0 : -errno;
}

static void registration_facts(void)
{
    struct utsname u;
    uname(&u);
    printf("arm64 kernel: %s %s, %ld CPUs online, RSEQ_SIG %#x, arch %s\n", u.release,
           u.machine, sysconf(_SC_NPROCESSORS_ONLN), RSEQ_SIG, RSEQ_ARCH_NAME);

    const unsigned int *size = dlsym(RTLD_DEFAULT, "__rseq_size");
    const ptrdiff_t *offset = dlsym(RTLD_DEFAULT, "__rseq_offset");
    check(size && offset && *size > 0, "glibc registers rseq", "__rseq_size=%u __rseq_offset=%ld",
          size ? *size : 0, offset ? (long)*offset : 0L);
    if (!size || !offset || !*size)
        return;
    struct rseq_abi *area = (struct rseq_abi *)((char *)rseq_arch_thread_pointer() + *offset);
    check((int32_t)area->cpu_id >= 0, "cpu_id maintained", "cpu_id=%d cpu_id_start=%u",
          (int32_t)area->cpu_id, area->cpu_id_start);

    int again = raw_rseq(area, RSEQ_ORIG_SIZE, 0, RSEQ_SIG);
    check(again == -EBUSY, "glibc registered 32 bytes with our signature",
          "rseq(area, 32, 0, %#x) = %s", RSEQ_SIG, strerror(-again));
    int other = raw_rseq(area, RSEQ_ORIG_SIZE, 0, RSEQ_SIG ^ 1);
    check(other == -EPERM, "another signature is refused", "rseq(area, 32, 0, %#x) = %s",
          RSEQ_SIG ^ 1, strerror(-other));

    unsigned long feature = getauxval(RSEQ_AT_FEATURE_SIZE);
    unsigned long align = getauxval(RSEQ_AT_ALIGN);
    printf("arm64 auxv: AT_RSEQ_FEATURE_SIZE=%lu AT_RSEQ_ALIGN=%lu (0: before Linux 6.3)\n",
           feature, align);

    const struct rseq_process *p = rseq_process_get();
    struct rseq_thread *t = rseq_thread_get();
    check(p->kernel == 1 && p->owner == RSEQ_OWNER_GLIBC && t && t->area == area,
          "registration.c adopts glibc's area", "kernel=%d owner=%s area=%s", p->kernel,
          rseq_owner_name(p->owner) ? rseq_owner_name(p->owner) : "none",
          t && t->area == area ? "glibc's" : "other");
    if (t && feature == 0)
        check(t->usable_size == RSEQ_ORIG_FEATURE_SIZE && t->registered_size == RSEQ_ORIG_SIZE,
              "pre-6.3 usable size", "usable=%u registered=%u", t->usable_size,
              t->registered_size);
}

/* ---------------------------------------------------------------------------
 * 2. counter.h: adds in sequences, resets with the 16-byte CAS
 * ------------------------------------------------------------------------- */

#define COUNTER_THREADS 4
#define COUNTER_ADDS 20000

static struct counter_slots counter;
static int counter_stop;
static long counter_refused;

static void *counter_adder(void *arg)
{
    (void)arg;
    for (int i = 0; i < COUNTER_ADDS; i++)
        if (counter_add(&counter, 1) != 0)
            __atomic_fetch_add(&counter_refused, 1, __ATOMIC_RELAXED);
    return NULL;
}

/* A second resetter, so that resets race each other on the baseline CAS. */
static __int128 resetter_removed;
static long resetter_resets;

static void *counter_resetter(void *arg)
{
    (void)arg;
    while (!__atomic_load_n(&counter_stop, __ATOMIC_RELAXED)) {
        resetter_removed += counter_reset(&counter);
        resetter_resets++;
    }
    return NULL;
}

static void counter_check(void)
{
    static __int128 baseline __attribute__((aligned(16)));
    static int64_t fallback;
    int ncpu = rseq_possible_cpus();

    counter.region_size = 128;
    counter.nslots = (uint32_t)ncpu;
    counter.regions = aligned_alloc(128, (size_t)ncpu * 128);
    memset(counter.regions, 0, (size_t)ncpu * 128);
    counter.fallback = &fallback;
    counter.baseline = &baseline;
    counter.mode = RSEQ_INDEX_CPU_ID;

    /* A baseline whose high half is not 0, so the first reset's CAS must
     * compare and replace both 64-bit halves. */
    baseline = -((__int128)1 << 64) - 5;
    __int128 start = counter_value(&counter);

    pthread_t th[COUNTER_THREADS], resetter;
    pthread_create(&resetter, NULL, counter_resetter, NULL);
    for (int i = 0; i < COUNTER_THREADS; i++)
        pthread_create(&th[i], NULL, counter_adder, NULL);
    __int128 removed = 0;
    long resets = 0;
    for (int joined = 0; joined < COUNTER_THREADS;) {
        removed += counter_reset(&counter);
        resets++;
        if (pthread_tryjoin_np(th[joined], NULL) == 0)
            joined++;
    }
    __atomic_store_n(&counter_stop, 1, __ATOMIC_RELAXED);
    pthread_join(resetter, NULL);
    removed += resetter_removed;
    resets += resetter_resets;
    __int128 total = removed + counter_value(&counter) - start;
    check(total == (__int128)COUNTER_THREADS * COUNTER_ADDS && counter_refused == 0 &&
              fallback == 0,
          "counter.h exact across resets",
          "adds=%d counted=%lld resets=%ld refused=%ld fallback_lane=%lld",
          COUNTER_THREADS * COUNTER_ADDS, (long long)total, resets, counter_refused,
          (long long)fallback);
}

/* ---------------------------------------------------------------------------
 * 3. The cases
 * ------------------------------------------------------------------------- */

static int cases_run, cases_passed, cases_skipped;
static long aborts_total;

static void run_case(char *line)
{
    char *argv[64], *envp[16];
    int argc = 0, envc = 0;
    for (char *tok = strtok(line, " \t\n"); tok && argc < 63; tok = strtok(NULL, " \t\n")) {
        if (argc == 0 && strchr(tok, '=') && envc < 15)
            envp[envc++] = tok;
        else
            argv[argc++] = tok;
    }
    if (argc == 0)
        return;
    argv[argc] = NULL;
    envp[envc] = NULL;

    static char buf[1 << 16];
    int status = 0;
    double t0 = now(), secs;
    /* A case whose only failure is "no sequence aborted" ran before the
     * storm or the delays hit a sequence (a quiet machine runs a case in
     * 50 ms): run it again, at most twice.  Wrong totals are never retried. */
    for (int attempt = 1;; attempt++) {
        int out[2];
        if (pipe(out) != 0)
            return;
        pid_t pid = fork();
        if (pid == 0) {
            dup2(out[1], 1);
            dup2(out[1], 2);
            close(out[0]);
            execve(argv[0], argv, envp);
            printf("execve %s: %s\n", argv[0], strerror(errno));
            _exit(127);
        }
        close(out[1]);
        size_t len = 0;
        ssize_t n;
        while ((n = read(out[0], buf + len, sizeof buf - 1 - len)) > 0)
            len += (size_t)n;
        close(out[0]);
        buf[len] = 0;
        waitpid(pid, &status, 0);
        const char *no_abort = strstr(buf, "FAIL: no sequence aborted");
        int only_no_abort = no_abort && strstr(buf, "FAIL") == no_abort &&
                            !strstr(no_abort + 1, "FAIL");
        if (!(WIFEXITED(status) && WEXITSTATUS(status) == 1 && only_no_abort) || attempt == 3)
            break;
        printf("case %s: no sequence aborted on attempt %d, running it again\n", argv[0],
               attempt);
    }
    secs = now() - t0;

    cases_run++;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    const char *last = buf;
    for (const char *p = buf; *p; p++)
        if (*p == '\n' && p[1])
            last = p + 1;
    const char *a = strstr(buf, "aborts=");
    long aborts = a ? atol(a + 7) : 0;
    printf("case:");
    for (int i = 0; i < envc; i++)
        printf(" %s", envp[i]);
    for (int i = 0; i < argc; i++)
        printf(" %s", argv[i]);
    printf("\n");
    if (code == 77) {
        cases_skipped++;
        printf("  skipped (%.1fs): %s", secs, buf);
        return;
    }
    if (code != 0 || strncmp(last, "OK", 2) != 0) {
        failures++;
        printf("  FAIL (exit %d, %.1fs):\n%s\n", code, secs, buf);
        return;
    }
    cases_passed++;
    aborts_total += aborts;
    /* The check's totals and the figures: every line but the banner (which
     * repeats the arguments) and the final OK. */
    printf("  ok (%.1fs)\n", secs);
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
        if (strncmp(line, "param_test:", 11) != 0 && strcmp(line, "OK") != 0)
            printf("    %s\n", line);
}

/* The matrix of /cases covers every window inside a sequence (points below
 * 7) that workload.c's table lists for each primitive: one home for that
 * fact, and a point added there cannot be forgotten here. */
static void check_coverage(void)
{
    static const char *const primitives[][2] = {
        {"counter", "add"}, {"cbne", "cbne"}, {"bov", "bov"}, {"list", "list"},
        {"store_store", "store_store"}, {"memcpy", "memcpy"}};
    int missing = 0, covered = 0;
    char first[64] = "";
    FILE *cases = fopen("/cases", "re");
    if (cases) {
        if (!fgets(first, sizeof first, cases))
            first[0] = 0;
        fclose(cases);
    }
    if (strncmp(first, "# partial", 9) == 0) {
        printf("arm64 matrix: a partial case list (RSEQ_ARM64_CASES): coverage not checked\n");
        return;
    }
    for (size_t i = 0; i < sizeof primitives / sizeof primitives[0]; i++) {
        unsigned int mask = 0;
        for (size_t j = 0; j < workload_points_count; j++)
            if (strcmp(workload_points[j].name, primitives[i][1]) == 0)
                mask = workload_points[j].mask;
        for (int point = 1; point < 7; point++) {
            if (!(mask & (1u << point)))
                continue;
            char want_test[64], want_point[8], line[1024];
            snprintf(want_test, sizeof want_test, " -T %s ", primitives[i][0]);
            snprintf(want_point, sizeof want_point, " -%d ", point);
            int found = 0;
            FILE *f = fopen("/cases", "re");
            while (f && !found && fgets(line, sizeof line, f))
                found = strstr(line, "/param_test ") && strstr(line, want_test) &&
                        strstr(line, want_point);
            if (f)
                fclose(f);
            if (found) {
                covered++;
            } else {
                missing++;
                printf("arm64 matrix misses point %d of %s\n", point, primitives[i][0]);
            }
        }
    }
    check(missing == 0 && covered > 0, "the matrix covers every in-sequence point",
          "%d (primitive, point) pairs of workload.c's table, %d missing", covered, missing);
}

static void run_cases(void)
{
    FILE *f = fopen("/cases", "re");
    if (!f) {
        check(0, "cases", "/cases: %s", strerror(errno));
        return;
    }
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n')
            continue;
        run_case(line);
    }
    fclose(f);
}

int main(void)
{
    setup_system();
    double t0 = now();
    printf("arm64 init: start\n");
    registration_facts();
    counter_check();
    check_coverage();
    run_cases();
    check(aborts_total > 0, "sequences aborted", "aborts=%ld over the passing cases",
          aborts_total);
    printf("arm64 summary: cases=%d passed=%d skipped=%d failed=%d aborts=%ld time=%.1fs\n",
           cases_run, cases_passed, cases_skipped, cases_run - cases_passed - cases_skipped,
           aborts_total, now() - t0);
    printf("arm64 result: %s\n", failures == 0 && cases_passed > 0 ? "PASS" : "FAIL");
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
