/* Most of CUring is `static inline` in its headers. This file holds the few
 * things that need _GNU_SOURCE, which the headers must not define (it would
 * make their view of glibc differ from Swift's Glibc module), and it makes a
 * real C compile check the headers' _Static_asserts. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include "CUring.h"

const short cu_posix_spawn_setsid = POSIX_SPAWN_SETSID;

int cu_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

long cu_pwrite_flags(int fd, const void *buf, size_t len, long long off, int flags) {
    struct iovec v = { .iov_base = (void *)buf, .iov_len = len };
    return pwritev2(fd, &v, 1, off, flags);
}

int cu_fallocate(int fd, int mode, long long off, long long len) {
    return fallocate(fd, mode, off, len) == 0 ? 0 : -errno;
}



int cu_accept_nonblock(int fd) {
    int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    return c < 0 ? -errno : c;
}

int cu_dio_align(int fd, unsigned *mem_align, unsigned *offset_align) {
    struct statx stx;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) != 0) return -errno;
    if (!(stx.stx_mask & STATX_DIOALIGN)) return -EOPNOTSUPP;
    *mem_align = stx.stx_dio_mem_align;
    *offset_align = stx.stx_dio_offset_align;
    return 0;
}

int cu_logical_block_size(int fd) {
    int size = 0;
    return ioctl(fd, BLKSSZGET, &size) < 0 ? -errno : size;
}
