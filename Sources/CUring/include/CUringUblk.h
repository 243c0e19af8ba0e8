/*
 * CUringUblk: the project's own copy of the ublk UAPI
 * (include/uapi/linux/ublk_cmd.h), as of Linux 6.12 and later: Debian 12's
 * <linux/ublk_cmd.h> is from 6.1 and lacks most of what 6.12 offers. Own
 * names (`ublk_*`/`UBLK_*`) identical to the kernel's; the system header is
 * deliberately never included. Layouts and opcodes are pinned by
 * _Static_asserts (compiled for real by shim.c). ABI only, no policy.
 * Included by CUring.h.
 */
#ifndef CURING_UBLK_H
#define CURING_UBLK_H

#include <errno.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/types.h>

struct ublksrv_ctrl_cmd {
    __u32 dev_id;
    __u16 queue_id;
    __u16 len;
    __u64 addr;
    __u64 data[1];
    __u16 dev_path_len;
    __u16 pad;
    __u32 reserved;
};

struct ublksrv_ctrl_dev_info {
    __u16 nr_hw_queues;
    __u16 queue_depth;
    __u16 state;
    __u16 pad0;
    __u32 max_io_buf_bytes;
    __u32 dev_id;
    __s32 ublksrv_pid;
    __u32 pad1;
    __u64 flags;
    __u64 ublksrv_flags;
    __u32 owner_uid;
    __u32 owner_gid;
    __u64 reserved1;
    __u64 reserved2;
};

struct ublksrv_io_desc {
    __u32 op_flags;      /* op: bits 0-7, flags: bits 8-31 */
    __u32 nr_sectors;    /* union with nr_zones */
    __u64 start_sector;
    __u64 addr;
};

struct ublksrv_io_cmd {
    __u16 q_id;
    __u16 tag;
    __s32 result;
    __u64 addr;          /* union with zone_append_lba */
};

struct ublk_param_basic {
    __u32 attrs;
    __u8 logical_bs_shift;
    __u8 physical_bs_shift;
    __u8 io_opt_shift;
    __u8 io_min_shift;
    __u32 max_sectors;
    __u32 chunk_sectors;
    __u64 dev_sectors;
    __u64 virt_boundary_mask;
};

struct ublk_param_discard {
    __u32 discard_alignment;
    __u32 discard_granularity;
    __u32 max_discard_sectors;
    __u32 max_write_zeroes_sectors;
    __u16 max_discard_segments;
    __u16 reserved0;
};

struct ublk_param_devt {
    __u32 char_major;
    __u32 char_minor;
    __u32 disk_major;
    __u32 disk_minor;
};

struct ublk_param_zoned {
    __u32 max_open_zones;
    __u32 max_active_zones;
    __u32 max_zone_append_sectors;
    __u8 reserved[20];
};

/* UBLK_PARAM_TYPE_DMA_ALIGN (6.14+): `alignment` is a mask (bytes - 1, below
 * PAGE_SIZE) the request buffers' addresses must satisfy. */
struct ublk_param_dma_align {
    __u32 alignment;
    __u8 pad[4];
};

/* The 6.12 layout plus dma_align; later kernels append segment and integrity
 * parameters. `len` tells the kernel how much of the struct we know: 6.12
 * copies only the first 112 bytes (dma sits at 108) and drops the type bits it does not know
 * (UBLK_PARAM_TYPE_ALL), so dma_align is simply absent there. */
struct ublk_params {
    __u32 len;
    __u32 types;
    struct ublk_param_basic basic;
    struct ublk_param_discard discard;
    struct ublk_param_devt devt;
    struct ublk_param_zoned zoned;
    struct ublk_param_dma_align dma;
};

_Static_assert(sizeof(struct ublksrv_ctrl_cmd) == 32, "ctrl cmd");
_Static_assert(sizeof(struct ublksrv_ctrl_dev_info) == 64, "dev info");
_Static_assert(sizeof(struct ublksrv_io_desc) == 24, "io desc");
_Static_assert(sizeof(struct ublksrv_io_cmd) == 16, "io cmd");
_Static_assert(sizeof(struct ublk_param_basic) == 32, "basic");
_Static_assert(sizeof(struct ublk_param_discard) == 20, "discard");
_Static_assert(sizeof(struct ublk_param_dma_align) == 8, "dma_align");
_Static_assert(offsetof(struct ublk_params, dma) == 108, "dma_align offset");
_Static_assert(sizeof(struct ublk_params) == 120, "params");

/* Command numbers (the _IOC_NR part). */
#define UBLK_CMD_GET_QUEUE_AFFINITY 0x01
#define UBLK_CMD_GET_DEV_INFO 0x02
#define UBLK_CMD_ADD_DEV 0x04
#define UBLK_CMD_DEL_DEV 0x05
#define UBLK_CMD_START_DEV 0x06
#define UBLK_CMD_STOP_DEV 0x07
#define UBLK_CMD_SET_PARAMS 0x08
#define UBLK_CMD_GET_PARAMS 0x09
#define UBLK_CMD_START_USER_RECOVERY 0x10
#define UBLK_CMD_END_USER_RECOVERY 0x11
#define UBLK_CMD_GET_DEV_INFO2 0x12
#define UBLK_CMD_GET_FEATURES 0x13
#define UBLK_CMD_DEL_DEV_ASYNC 0x14
#define UBLK_CMD_UPDATE_SIZE 0x15
#define UBLK_CMD_QUIESCE_DEV 0x16

#define UBLK_IO_FETCH_REQ 0x20
#define UBLK_IO_COMMIT_AND_FETCH_REQ 0x21
#define UBLK_IO_NEED_GET_DATA 0x22
#define UBLK_IO_REGISTER_IO_BUF 0x23
#define UBLK_IO_UNREGISTER_IO_BUF 0x24

/* ioctl-encoded opcodes, written out as plain constants (Swift cannot
 * import function-like macros) and checked against the encoding below. */
#define UBLK_U_CMD_GET_QUEUE_AFFINITY 0x80207501u
#define UBLK_U_CMD_GET_DEV_INFO 0x80207502u
#define UBLK_U_CMD_ADD_DEV 0xc0207504u
#define UBLK_U_CMD_DEL_DEV 0xc0207505u
#define UBLK_U_CMD_START_DEV 0xc0207506u
#define UBLK_U_CMD_STOP_DEV 0xc0207507u
#define UBLK_U_CMD_SET_PARAMS 0xc0207508u
#define UBLK_U_CMD_GET_PARAMS 0x80207509u
#define UBLK_U_CMD_START_USER_RECOVERY 0xc0207510u
#define UBLK_U_CMD_END_USER_RECOVERY 0xc0207511u
#define UBLK_U_CMD_GET_DEV_INFO2 0x80207512u
#define UBLK_U_CMD_GET_FEATURES 0x80207513u
#define UBLK_U_CMD_DEL_DEV_ASYNC 0x80207514u
#define UBLK_U_IO_FETCH_REQ 0xc0107520u
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ 0xc0107521u
#define UBLK_U_IO_NEED_GET_DATA 0xc0107522u
#define UBLK_U_IO_REGISTER_IO_BUF 0xc0107523u
#define UBLK_U_IO_UNREGISTER_IO_BUF 0xc0107524u

_Static_assert(UBLK_U_CMD_GET_DEV_INFO == _IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_GET_QUEUE_AFFINITY == _IOR('u', UBLK_CMD_GET_QUEUE_AFFINITY, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_ADD_DEV == _IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_DEL_DEV == _IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_START_DEV == _IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_STOP_DEV == _IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_SET_PARAMS == _IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_GET_PARAMS == _IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_START_USER_RECOVERY == _IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_END_USER_RECOVERY == _IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_GET_DEV_INFO2 == _IOR('u', UBLK_CMD_GET_DEV_INFO2, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_GET_FEATURES == _IOR('u', UBLK_CMD_GET_FEATURES, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_CMD_DEL_DEV_ASYNC == _IOR('u', UBLK_CMD_DEL_DEV_ASYNC, struct ublksrv_ctrl_cmd), "op");
_Static_assert(UBLK_U_IO_FETCH_REQ == _IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd), "op");
_Static_assert(UBLK_U_IO_COMMIT_AND_FETCH_REQ == _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd), "op");
_Static_assert(UBLK_U_IO_NEED_GET_DATA == _IOWR('u', UBLK_IO_NEED_GET_DATA, struct ublksrv_io_cmd), "op");
_Static_assert(UBLK_U_IO_REGISTER_IO_BUF == _IOWR('u', UBLK_IO_REGISTER_IO_BUF, struct ublksrv_io_cmd), "op");
_Static_assert(UBLK_U_IO_UNREGISTER_IO_BUF == _IOWR('u', UBLK_IO_UNREGISTER_IO_BUF, struct ublksrv_io_cmd), "op");

#define UBLK_IO_RES_OK 0
#define UBLK_IO_RES_NEED_GET_DATA 1
#define UBLK_IO_RES_ABORT (-ENODEV)

#define UBLKSRV_CMD_BUF_OFFSET 0
#define UBLKSRV_IO_BUF_OFFSET 0x80000000
#define UBLK_MAX_QUEUE_DEPTH 4096
#define UBLK_MAX_NR_QUEUES 4096

/* UBLK_F_USER_COPY: request data is read and written at these offsets of /dev/ublkcN. */
#define UBLK_IO_BUF_BITS 25
#define UBLK_TAG_OFF UBLK_IO_BUF_BITS
#define UBLK_TAG_BITS 16
#define UBLK_QID_OFF (UBLK_TAG_OFF + UBLK_TAG_BITS)
static inline long long cu_user_copy_pos(__u16 q_id, __u16 tag, __u32 offset) {
    return (long long)UBLKSRV_IO_BUF_OFFSET + ((((long long)q_id) << UBLK_QID_OFF) | (((long long)tag) << UBLK_TAG_OFF) | offset);
}
#define UBLK_FEATURES_LEN 8

/* Feature bits (ublksrv_ctrl_dev_info.flags and GET_FEATURES). */
#define UBLK_F_SUPPORT_ZERO_COPY (1ULL << 0)
#define UBLK_F_URING_CMD_COMP_IN_TASK (1ULL << 1)
#define UBLK_F_NEED_GET_DATA (1ULL << 2)
#define UBLK_F_USER_RECOVERY (1ULL << 3)
#define UBLK_F_USER_RECOVERY_REISSUE (1ULL << 4)
#define UBLK_F_UNPRIVILEGED_DEV (1ULL << 5)
#define UBLK_F_CMD_IOCTL_ENCODE (1ULL << 6)
#define UBLK_F_USER_COPY (1ULL << 7)
#define UBLK_F_ZONED (1ULL << 8)
#define UBLK_F_USER_RECOVERY_FAIL_IO (1ULL << 9)
#define UBLK_F_UPDATE_SIZE (1ULL << 10)
#define UBLK_F_AUTO_BUF_REG (1ULL << 11)
#define UBLK_F_QUIESCE (1ULL << 12)
#define UBLK_F_PER_IO_DAEMON (1ULL << 13)
#define UBLK_F_BUF_REG_OFF_DAEMON (1ULL << 14)
#define UBLK_F_BATCH_IO (1ULL << 15)
#define UBLK_F_INTEGRITY (1ULL << 16)
#define UBLK_F_SAFE_STOP_DEV (1ULL << 17)
#define UBLK_F_NO_AUTO_PART_SCAN (1ULL << 18)
#define UBLK_F_SHMEM_ZC (1ULL << 19)
#define UBLK_F_IO_DESC_SIZE (1ULL << 20)

/* Device states. */
#define UBLK_S_DEV_DEAD 0
#define UBLK_S_DEV_LIVE 1
#define UBLK_S_DEV_QUIESCED 2
#define UBLK_S_DEV_FAIL_IO 3

/* I/O ops and flags (ublksrv_io_desc.op_flags). */
#define UBLK_IO_OP_READ 0
#define UBLK_IO_OP_WRITE 1
#define UBLK_IO_OP_FLUSH 2
#define UBLK_IO_OP_DISCARD 3
#define UBLK_IO_OP_WRITE_SAME 4
#define UBLK_IO_OP_WRITE_ZEROES 5
#define UBLK_IO_F_FAILFAST_DEV (1U << 8)
#define UBLK_IO_F_FAILFAST_TRANSPORT (1U << 9)
#define UBLK_IO_F_FAILFAST_DRIVER (1U << 10)
#define UBLK_IO_F_META (1U << 11)
#define UBLK_IO_F_FUA (1U << 13)
#define UBLK_IO_F_NOUNMAP (1U << 15)
#define UBLK_IO_F_SWAP (1U << 16)
/* UBLK_F_AUTO_BUF_REG with UBLK_AUTO_BUF_REG_FALLBACK: the automatic
 * registration failed and the server must register the buffer itself. */
#define UBLK_IO_F_NEED_REG_BUF (1U << 17)

/* UBLK_F_AUTO_BUF_REG (6.16+): FETCH and COMMIT_AND_FETCH carry this in
 * sqe->addr (not in the command): the request's pages are registered at
 * `index` of the issuing ring's buffer table before the request is handed
 * over, and unregistered when it is committed. Encoded as index | flags << 16
 * | reserved0 << 24 | reserved1 << 32; reserved fields must be zero. */
struct ublk_auto_buf_reg {
    __u16 index;
    __u8 flags;
    __u8 reserved0;
    __u32 reserved1;
};
_Static_assert(sizeof(struct ublk_auto_buf_reg) == 8, "auto buf reg");
#define UBLK_AUTO_BUF_REG_FALLBACK (1 << 0)
static inline __u64 cu_auto_buf_reg_addr(__u16 index, __u8 flags) {
    return (__u64)index | (__u64)flags << 16;
}

/* Parameter attributes and types. */
#define UBLK_ATTR_READ_ONLY (1 << 0)
#define UBLK_ATTR_ROTATIONAL (1 << 1)
#define UBLK_ATTR_VOLATILE_CACHE (1 << 2)
#define UBLK_ATTR_FUA (1 << 3)
#define UBLK_PARAM_TYPE_BASIC (1 << 0)
#define UBLK_PARAM_TYPE_DISCARD (1 << 1)
#define UBLK_PARAM_TYPE_DEVT (1 << 2)
#define UBLK_PARAM_TYPE_ZONED (1 << 3)
#define UBLK_PARAM_TYPE_DMA_ALIGN (1 << 4)

#endif
