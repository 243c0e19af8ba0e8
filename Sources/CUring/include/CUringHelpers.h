/*
 * CUringHelpers: what Swift cannot reach by itself, as constants and small
 * inline helpers: macros, the anonymous unions of `struct io_uring_sqe`,
 * `sqe->cmd`, batched reaping, atomics, and the few calls that need
 * _GNU_SOURCE (defined in shim.c, declared here). ABI only, no policy: no
 * retries, no error strings, no defaults. Included by CUring.h.
 */
#ifndef CURING_HELPERS_H
#define CURING_HELPERS_H

#include <errno.h>
#include <poll.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <sys/mman.h>
#include <linux/fs.h>
#include <linux/falloc.h>
#include <liburing.h>
#include "CUringUblk.h"

/* ---------------------------------------------------------------------------
 * Constants Swift cannot see through macros.
 * ------------------------------------------------------------------------- */
static const unsigned cu_fsync_datasync = IORING_FSYNC_DATASYNC;
static const int cu_rwf_dsync = RWF_DSYNC;
static const int cu_falloc_punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
static const int cu_falloc_zero = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
static const unsigned cu_setup_sqe128 = IORING_SETUP_SQE128;
static const unsigned cu_setup_coop = IORING_SETUP_COOP_TASKRUN;
static const unsigned cu_setup_single_issuer = IORING_SETUP_SINGLE_ISSUER;
static const unsigned cu_setup_defer_taskrun = IORING_SETUP_DEFER_TASKRUN;
static const unsigned cu_iosqe_fixed_file = IOSQE_FIXED_FILE;
static const unsigned cu_iosqe_io_hardlink = IOSQE_IO_HARDLINK;
static const unsigned cu_iosqe_cqe_skip_success = IOSQE_CQE_SKIP_SUCCESS;
static const unsigned cu_poll_in = POLLIN;
static const unsigned cu_poll_out = POLLOUT;
static const int cu_o_direct = __O_DIRECT;
static const int cu_io_res_abort = UBLK_IO_RES_ABORT;
static const int cu_efd_cloexec = EFD_CLOEXEC;
static const int cu_efd_nonblock = EFD_NONBLOCK;

/* ---------------------------------------------------------------------------
 * Inline helpers.
 * ------------------------------------------------------------------------- */

/* One reaped completion, copied out so the CQ slot can be released at once. */
struct cu_cqe {
    __u64 user_data;
    __s32 res;
    __u32 flags;
};

static inline int cu_queue_init(unsigned entries, struct io_uring *ring, unsigned flags) {
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = flags;
    return io_uring_queue_init_params(entries, ring, &p);
}

static inline struct io_uring_sqe *cu_get_sqe(struct io_uring *ring) {
    return io_uring_get_sqe(ring);
}

static inline unsigned cu_sq_space_left(struct io_uring *ring) {
    return io_uring_sq_space_left(ring);
}

/* A URING_CMD SQE: `cmd` (len bytes) is copied into sqe->cmd. A 64-byte SQE
 * holds 16 bytes of command, a 128-byte one (IORING_SETUP_SQE128) 80. */
static inline void cu_prep_uring_cmd(struct io_uring_sqe *sqe, int fd, __u32 cmd_op,
                                     const void *cmd, size_t len, __u64 user_data) {
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd;
    sqe->cmd_op = cmd_op;
    memcpy(sqe->cmd, cmd, len);
    sqe->user_data = user_data;
}

static inline void cu_prep_io_cmd(struct io_uring_sqe *sqe, int fd, unsigned sqe_flags, __u32 cmd_op,
                                  __u16 q_id, __u16 tag, __s32 result, __u64 addr, __u64 user_data) {
    struct ublksrv_io_cmd c = { .q_id = q_id, .tag = tag, .result = result, .addr = addr };
    cu_prep_uring_cmd(sqe, fd, cmd_op, &c, sizeof(c), user_data);
    sqe->flags = (__u8)sqe_flags;
}

/* FETCH / COMMIT_AND_FETCH with UBLK_F_AUTO_BUF_REG: the command's addr is 0
 * and sqe->addr carries the registration (cu_auto_buf_reg_addr). */
static inline void cu_prep_io_cmd_auto_reg(struct io_uring_sqe *sqe, int fd, __u32 cmd_op, __u16 q_id, __u16 tag,
                                           __s32 result, __u64 auto_reg, __u64 user_data) {
    cu_prep_io_cmd(sqe, fd, 0, cmd_op, q_id, tag, result, 0, user_data);
    sqe->addr = auto_reg;
}

/* READ_FIXED / WRITE_FIXED of a registered buffer. For a ublk request's
 * buffer the "address" is the byte offset into the request's data. */
static inline void cu_prep_read_fixed(struct io_uring_sqe *sqe, int fd, __u64 buf_offset, unsigned len,
                                      __u64 off, __u16 buf_index, __u64 user_data) {
    io_uring_prep_read_fixed(sqe, fd, (void *)(uintptr_t)buf_offset, len, off, buf_index);
    sqe->user_data = user_data;
}

static inline void cu_prep_write_fixed(struct io_uring_sqe *sqe, int fd, __u64 buf_offset, unsigned len,
                                       __u64 off, __u16 buf_index, int rw_flags, __u64 user_data) {
    io_uring_prep_write_fixed(sqe, fd, (const void *)(uintptr_t)buf_offset, len, off, buf_index);
    sqe->rw_flags = rw_flags;
    sqe->user_data = user_data;
}

/* A sparse buffer table of `nr` empty slots (for ublk zero copy); 0 or -errno. */
static inline int cu_register_buffers_sparse(struct io_uring *ring, unsigned nr) {
    return io_uring_register_buffers_sparse(ring, nr);
}

static inline void cu_prep_read(struct io_uring_sqe *sqe, int fd, unsigned sqe_flags, void *buf,
                                unsigned len, __u64 off, __u64 user_data) {
    io_uring_prep_read(sqe, fd, buf, len, off);
    sqe->flags = (__u8)sqe_flags;
    sqe->user_data = user_data;
}

static inline void cu_prep_write(struct io_uring_sqe *sqe, int fd, unsigned sqe_flags, const void *buf,
                                 unsigned len, __u64 off, int rw_flags, __u64 user_data) {
    io_uring_prep_write(sqe, fd, buf, len, off);
    sqe->rw_flags = rw_flags;
    sqe->flags = (__u8)sqe_flags;
    sqe->user_data = user_data;
}

static inline void cu_prep_fsync(struct io_uring_sqe *sqe, int fd, unsigned sqe_flags, unsigned fsync_flags,
                                 __u64 user_data) {
    io_uring_prep_fsync(sqe, fd, fsync_flags);
    sqe->flags = (__u8)sqe_flags;
    sqe->user_data = user_data;
}

static inline void cu_prep_fallocate(struct io_uring_sqe *sqe, int fd, unsigned sqe_flags, int mode,
                                     __u64 off, __u64 len, __u64 user_data) {
    io_uring_prep_fallocate(sqe, fd, mode, off, len);
    sqe->flags = (__u8)sqe_flags;
    sqe->user_data = user_data;
}

static inline void cu_prep_poll_add(struct io_uring_sqe *sqe, int fd, unsigned mask, __u64 user_data) {
    io_uring_prep_poll_add(sqe, fd, mask);
    sqe->user_data = user_data;
}

static inline void cu_prep_nop(struct io_uring_sqe *sqe, __u64 user_data) {
    io_uring_prep_nop(sqe);
    sqe->user_data = user_data;
}

/* Copy up to `max` completions out of the CQ and release their slots. */
static inline unsigned cu_reap(struct io_uring *ring, struct cu_cqe *out, unsigned max) {
    unsigned head, n = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (n == max) break;
        out[n].user_data = cqe->user_data;
        out[n].res = cqe->res;
        out[n].flags = cqe->flags;
        n++;
    }
    io_uring_cq_advance(ring, n);
    return n;
}

/* Submit, and wait for at least one completion, at most `timeout_ns`
 * (0: no limit). Returns the number submitted or -errno (-ETIME on timeout). */
static inline int cu_submit_and_wait(struct io_uring *ring, unsigned wait_nr, long long timeout_ns) {
    if (timeout_ns <= 0)
        return io_uring_submit_and_wait(ring, wait_nr);
    struct __kernel_timespec ts = { .tv_sec = timeout_ns / 1000000000LL, .tv_nsec = timeout_ns % 1000000000LL };
    struct io_uring_cqe *cqe = NULL;
    return io_uring_submit_and_wait_timeout(ring, &cqe, wait_nr, &ts, NULL);
}

static inline int cu_blkgetsize64(int fd, __u64 *size) {
    return ioctl(fd, BLKGETSIZE64, size) < 0 ? -errno : 0;
}

static inline int cu_errno(void) { return errno; }

/* The file system type of fd (statfs f_type), or -errno. */
static inline long long cu_fs_type(int fd) {
    struct statfs fs;
    return fstatfs(fd, &fs) == 0 ? (long long)fs.f_type : -errno;
}

/* In shim.c (they need _GNU_SOURCE). */
extern const short cu_posix_spawn_setsid;
int cu_pipe_cloexec(int fds[2]);
/* fallocate(2), which glibc declares only under _GNU_SOURCE; 0 or -errno. */
int cu_fallocate(int fd, int mode, long long off, long long len);
/* accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC); fd or -errno. */
int cu_accept_nonblock(int fd);
/* statx(STATX_DIOALIGN) of fd: 0 with the direct I/O alignments (0 and 0:
 * the file takes no direct I/O), or -errno (-EOPNOTSUPP: the kernel does not
 * report them). In shim.c (statx needs _GNU_SOURCE). */
int cu_dio_align(int fd, unsigned *mem_align, unsigned *offset_align);
/* The logical block size of a block device (BLKSSZGET), or -errno. */
int cu_logical_block_size(int fd);
/* pwrite with RWF_* flags (pwritev2 of one buffer). */
long cu_pwrite_flags(int fd, const void *buf, size_t len, long long off, int flags);

/* A non-blocking monotonic timerfd, and arming it once, `nanos` from now (0 disarms). */
static inline int cu_timerfd(void) { return timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK); }
static inline int cu_timerfd_arm(int fd, __u64 nanos) {
    struct itimerspec spec;
    memset(&spec, 0, sizeof(spec));
    spec.it_value.tv_sec = (time_t)(nanos / 1000000000ULL);
    spec.it_value.tv_nsec = (long)(nanos % 1000000000ULL);
    return timerfd_settime(fd, 0, &spec, NULL);
}

static inline int cu_eventfd(unsigned initval, int flags) { return eventfd(initval, flags); }

/* Atomics on shared words (queues of one device: page bits, grace counters,
 * chunk use). Sequentially consistent unless named relaxed; see
 * UblkTarget/Targets/CachingMesh.swift for what each ordering guarantees. */
static inline __u64 cu_atomic_load_u64(const __u64 *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline __u64 cu_atomic_load_relaxed_u64(const __u64 *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void cu_atomic_store_u64(__u64 *p, __u64 v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline void cu_atomic_store_relaxed_u64(__u64 *p, __u64 v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline __u64 cu_atomic_add_u64(__u64 *p, __u64 v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline __u32 cu_atomic_load_relaxed_u32(const __u32 *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void cu_atomic_store_relaxed_u32(__u32 *p, __u32 v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline __u32 cu_atomic_add_relaxed_u32(__u32 *p, __u32 v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
static inline void cu_atomic_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

#endif
