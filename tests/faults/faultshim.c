/* Fault injection for dynblock's tests: an LD_PRELOAD library that makes
 * chosen I/O calls on chosen files fail like a failing device would.
 *
 * Environment (read once):
 *   FAULT_SUFFIX   only files whose path (from /proc/self/fd) ends with this
 *   FAULT_OP       "read" (pread/preadv), "write" (write/pwrite/pwritev) or
 *                  "sync" (fsync/fdatasync)
 *   FAULT_N        the first matching call to fail (1-based; default 1)
 *   FAULT_COUNT    how many calls to fail from there (-1: all; default 1)
 *   FAULT_OFF_LO, FAULT_OFF_HI
 *                  for positioned calls: only those touching [lo, hi)
 *   FAULT_ERRNO    errno to fail with (default EIO)
 *   FAULT_SHORT    "1": a failing write first moves half its bytes (a torn
 *                  write), then the next call reports the error
 *   FAULT_KILL_AT  SIGKILL the process at this matching call (after N)
 *
 * Not shipped with the package: the tests compile it with the system cc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *suffix;
static const char *op;
static long first = 1, count = 1, kill_at = -1;
static long long off_lo = 0, off_hi = -1;
static int err = EIO, torn = 0;
static long seen = 0, failed = 0;
static int ready = 0;

static void init(void) {
    if (ready) return;
    suffix = getenv("FAULT_SUFFIX");
    op = getenv("FAULT_OP");
    const char *v;
    if ((v = getenv("FAULT_N"))) first = atol(v);
    if ((v = getenv("FAULT_COUNT"))) count = atol(v);
    if ((v = getenv("FAULT_KILL_AT"))) kill_at = atol(v);
    if ((v = getenv("FAULT_OFF_LO"))) off_lo = atoll(v);
    if ((v = getenv("FAULT_OFF_HI"))) off_hi = atoll(v);
    if ((v = getenv("FAULT_ERRNO"))) err = atoi(v);
    if ((v = getenv("FAULT_SHORT"))) torn = atoi(v);
    ready = 1;
}

static int path_matches(int fd) {
    if (!suffix) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    size_t ls = strlen(suffix);
    return (size_t)n >= ls && strcmp(path + n - ls, suffix) == 0;
}

/* 1: fail this call; 0: let it through. */
static int should_fail(const char *kind, int fd, long long off, size_t len) {
    init();
    if (!op || strcmp(op, kind) != 0 || !path_matches(fd)) return 0;
    if (off >= 0 && off_hi >= 0 && (off + (long long)len <= off_lo || off >= off_hi)) return 0;
    seen++;
    if (kill_at > 0 && seen >= kill_at) kill(getpid(), SIGKILL);
    if (seen < first) return 0;
    if (count >= 0 && failed >= count) return 0;
    failed++;
    return 1;
}

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

static ssize_t fail_write(int fd, const void *buf, size_t len, off_t off, int positioned) {
    if (torn && len > 1) {
        REAL(ssize_t, pwrite64, int, const void *, size_t, off_t);
        REAL(ssize_t, write, int, const void *, size_t);
        ssize_t n = positioned ? real_pwrite64(fd, buf, len / 2, off) : real_write(fd, buf, len / 2);
        if (n > 0) {
            count = count >= 0 ? count + 1 : count; /* the retry of the rest fails too */
            return n;
        }
    }
    errno = err;
    return -1;
}

ssize_t pread64(int fd, void *buf, size_t len, off_t off) {
    REAL(ssize_t, pread64, int, void *, size_t, off_t);
    if (should_fail("read", fd, off, len)) { errno = err; return -1; }
    return real_pread64(fd, buf, len, off);
}
ssize_t pread(int fd, void *buf, size_t len, off_t off) { return pread64(fd, buf, len, off); }

static size_t iov_len(const struct iovec *iov, int n) {
    size_t t = 0;
    for (int i = 0; i < n; i++) t += iov[i].iov_len;
    return t;
}

ssize_t preadv64(int fd, const struct iovec *iov, int n, off_t off) {
    REAL(ssize_t, preadv64, int, const struct iovec *, int, off_t);
    if (should_fail("read", fd, off, iov_len(iov, n))) { errno = err; return -1; }
    return real_preadv64(fd, iov, n, off);
}
ssize_t preadv(int fd, const struct iovec *iov, int n, off_t off) { return preadv64(fd, iov, n, off); }

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off) {
    REAL(ssize_t, pwrite64, int, const void *, size_t, off_t);
    if (should_fail("write", fd, off, len)) return fail_write(fd, buf, len, off, 1);
    return real_pwrite64(fd, buf, len, off);
}
ssize_t pwrite(int fd, const void *buf, size_t len, off_t off) { return pwrite64(fd, buf, len, off); }

ssize_t pwritev64(int fd, const struct iovec *iov, int n, off_t off) {
    REAL(ssize_t, pwritev64, int, const struct iovec *, int, off_t);
    if (should_fail("write", fd, off, iov_len(iov, n))) { errno = err; return -1; }
    return real_pwritev64(fd, iov, n, off);
}
ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t off) { return pwritev64(fd, iov, n, off); }

ssize_t write(int fd, const void *buf, size_t len) {
    REAL(ssize_t, write, int, const void *, size_t);
    if (should_fail("write", fd, -1, len)) return fail_write(fd, buf, len, 0, 0);
    return real_write(fd, buf, len);
}

int fdatasync(int fd) {
    REAL(int, fdatasync, int);
    if (should_fail("sync", fd, -1, 0)) { errno = err; return -1; }
    return real_fdatasync(fd);
}

int fsync(int fd) {
    REAL(int, fsync, int);
    if (should_fail("sync", fd, -1, 0)) { errno = err; return -1; }
    return real_fsync(fd);
}
