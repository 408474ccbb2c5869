/*
 * stagehand.h: the stagehand hypercall ABI, version 1.1, for C guest drivers.
 *
 * The values are those of the Rust crate `stagehand-abi` (abi/src/lib.rs); a host test of that
 * crate (abi/tests/header.rs) parses every #define below and compares it with the Rust
 * constant of the same meaning, so the two cannot drift apart. See docs/abi.md for the
 * semantics of each call.
 *
 * Calling convention: SMCCC 1.1 fast calls over HVC #0. Function ID in w0, arguments in x1-x6,
 * a signed status back in x0, results in x1-x3. Addresses are IPAs unless the VA flag says
 * otherwise; sizes are in bytes. The HVC wrappers exist only when compiling for aarch64
 * (GCC or Clang); everything else is plain C11. Inside a Linux kernel build (__KERNEL__) the
 * header takes its types from <linux/types.h> instead of the C library.
 */
#ifndef STAGEHAND_H
#define STAGEHAND_H

#ifdef __KERNEL__
/* Inside a Linux kernel build: no libc headers; <linux/types.h> defines the fixed-width
 * uintN_t/intN_t types and size_t this header uses, <linux/stddef.h> offsetof. */
#include <linux/stddef.h>
#include <linux/types.h>
#else
#include <stddef.h>
#include <stdint.h>
#endif

/* ABI version (REVISION: x0 major, x1 minor). */
#define STAGEHAND_ABI_MAJOR 1
#define STAGEHAND_ABI_MINOR 1

/* CALL_UID answer, a61eba14-6d38-495c-9e88-7830b073fe65, as w0-w3. */
#define STAGEHAND_UUID_W0 0x14ba1ea6u
#define STAGEHAND_UUID_W1 0x5c49386du
#define STAGEHAND_UUID_W2 0x3078889eu
#define STAGEHAND_UUID_W3 0x65fe73b0u

/* Function IDs (w0). DMA_MAP_SG and DMA_UNMAP_SG are new in ABI 1.1. */
#define STAGEHAND_FN_CALL_UID 0x8600FF01u
#define STAGEHAND_FN_REVISION 0x8600FF03u
#define STAGEHAND_FN_FEATURES 0xC6000001u
#define STAGEHAND_FN_MEM_SET_ATTR 0xC6000010u
#define STAGEHAND_FN_MEM_GET_ATTR 0xC6000011u
#define STAGEHAND_FN_MEM_QUERY_VA 0xC6000012u
#define STAGEHAND_FN_CACHE_OP 0xC6000020u
#define STAGEHAND_FN_CACHE_OP_BATCH 0xC6000021u
#define STAGEHAND_FN_DEV_INFO 0xC6000030u
#define STAGEHAND_FN_DMA_MAP 0xC6000031u
#define STAGEHAND_FN_DMA_UNMAP 0xC6000032u
#define STAGEHAND_FN_DMA_SYNC 0xC6000033u
#define STAGEHAND_FN_DMA_MAP_SG 0xC6000034u
#define STAGEHAND_FN_DMA_UNMAP_SG 0xC6000035u
#define STAGEHAND_FN_AUDIT_READ 0xC6000040u
#define STAGEHAND_FN_AUDIT_MARK 0xC6000041u

/* Status codes (x0, signed). */
#define STAGEHAND_SUCCESS 0
#define STAGEHAND_INCOMPLETE 1
#define STAGEHAND_NOT_SUPPORTED (-1)
#define STAGEHAND_NOT_REQUIRED (-2)
#define STAGEHAND_INVALID_PARAMETER (-3)
#define STAGEHAND_ALIGNMENT (-4)
#define STAGEHAND_OUT_OF_RANGE (-5)
#define STAGEHAND_DENIED (-6)
#define STAGEHAND_BUSY (-7)
#define STAGEHAND_NO_MEMORY (-8)
#define STAGEHAND_NO_DEVICE (-9)
#define STAGEHAND_BAD_HANDLE (-10)

/* FEATURES x1 capability bits. */
#define STAGEHAND_FEATURE_FWB 0x1u
#define STAGEHAND_FEATURE_SMMU 0x2u
#define STAGEHAND_FEATURE_DMA_STRICT 0x4u
#define STAGEHAND_FEATURE_VA_ADDRESSING 0x8u

/* Stage-2 attributes (MEM_SET_ATTR x3, MEM_GET_ATTR x1). */
#define STAGEHAND_ATTR_NORMAL_WB 0
#define STAGEHAND_ATTR_NORMAL_NC 1

/* MEM_GET_ATTR x2 flags. */
#define STAGEHAND_PAGE_PINNED 0x1u
#define STAGEHAND_PAGE_BLOCK_MAPPED 0x2u

/* MEM_QUERY_VA x2 access kinds, and the MAIR encodings it reports in x2 and x3. */
#define STAGEHAND_ACCESS_READ 0
#define STAGEHAND_ACCESS_WRITE 1
#define STAGEHAND_MAIR_NORMAL_WB 0xFFu
#define STAGEHAND_MAIR_NORMAL_NC 0x44u
#define STAGEHAND_MAIR_DEVICE_NGNRNE 0x00u

/* CACHE_OP x3 (and a batch entry's op): one operation, or-ed with the VA flag. */
#define STAGEHAND_CACHE_CLEAN 1
#define STAGEHAND_CACHE_INVALIDATE 2
#define STAGEHAND_CACHE_CLEAN_INVALIDATE 3
#define STAGEHAND_CACHE_FLAG_VA 0x100u
/* CACHE_OP x2 result flag: an INVALIDATE was widened to CLEAN_INVALIDATE. */
#define STAGEHAND_CACHE_RESULT_WIDENED 0x1u

/* CACHE_OP_BATCH: entry layout and limits. */
#define STAGEHAND_BATCH_ENTRY_SIZE 24
#define STAGEHAND_BATCH_ARRAY_ALIGN 8
#define STAGEHAND_BATCH_ENTRIES_PER_CALL 64
#define STAGEHAND_BATCH_MAX_ENTRIES 0x1000000u
#define STAGEHAND_BATCH_COOKIE_ENTRY_SHIFT 40

/* DMA_MAP x4 / DMA_MAP_SG x4 directions, DMA_SYNC x4 targets, DEV_INFO x3 flags. */
#define STAGEHAND_DMA_BIDIRECTIONAL 0
#define STAGEHAND_DMA_TO_DEVICE 1
#define STAGEHAND_DMA_FROM_DEVICE 2
#define STAGEHAND_DMA_SYNC_FOR_CPU 0
#define STAGEHAND_DMA_SYNC_FOR_DEVICE 1
#define STAGEHAND_DEV_COHERENT 0x1u
#define STAGEHAND_DEV_STRICT 0x2u

/* DMA_MAP_SG / DMA_UNMAP_SG (ABI 1.1): segment layout and limits. */
#define STAGEHAND_DMA_SG_SEGMENT_SIZE 24
#define STAGEHAND_DMA_SG_ARRAY_ALIGN 8
#define STAGEHAND_DMA_SG_HANDLE_OFFSET 16
#define STAGEHAND_DMA_SG_SEGMENTS_PER_CALL 64
#define STAGEHAND_DMA_SG_MAX_SEGMENTS 0x1000000u

/* Page size the ABI counts in. */
#define STAGEHAND_PAGE_SIZE 4096

/*
 * How many calls in a row may answer INCOMPLETE without progress before the loop helpers below
 * give up (stagehand always makes progress; this bounds a misbehaving hypervisor).
 */
#define STAGEHAND_MAX_STALLED_CALLS 8

/* One CACHE_OP_BATCH entry, little-endian as the guest stores it. */
struct stagehand_batch_entry {
    uint64_t addr;     /* IPA, or guest VA with STAGEHAND_CACHE_FLAG_VA in op */
    uint64_t size;     /* bytes, not zero */
    uint32_t op;       /* STAGEHAND_CACHE_* or-ed with STAGEHAND_CACHE_FLAG_VA */
    uint32_t reserved; /* zero */
};

_Static_assert(sizeof(struct stagehand_batch_entry) == STAGEHAND_BATCH_ENTRY_SIZE,
               "stagehand_batch_entry must be 24 bytes");
_Static_assert(_Alignof(struct stagehand_batch_entry) == STAGEHAND_BATCH_ARRAY_ALIGN,
               "stagehand_batch_entry must be 8-byte aligned");
_Static_assert(offsetof(struct stagehand_batch_entry, size) == 8 &&
                   offsetof(struct stagehand_batch_entry, op) == 16 &&
                   offsetof(struct stagehand_batch_entry, reserved) == 20,
               "stagehand_batch_entry fields are {u64 addr, u64 size, u32 op, u32 reserved}");

/*
 * One DMA_MAP_SG segment, little-endian as the guest stores it. The driver fills in addr (the
 * buffer's IPA, any alignment; its IOVA is the same) and size (not zero, at most 16 MiB);
 * DMA_MAP_SG writes the mapping's handle, which DMA_UNMAP_SG reads back.
 */
struct stagehand_dma_segment {
    uint64_t addr;
    uint64_t size;
    uint64_t handle;
};

_Static_assert(sizeof(struct stagehand_dma_segment) == STAGEHAND_DMA_SG_SEGMENT_SIZE,
               "stagehand_dma_segment must be 24 bytes");
_Static_assert(_Alignof(struct stagehand_dma_segment) == STAGEHAND_DMA_SG_ARRAY_ALIGN,
               "stagehand_dma_segment must be 8-byte aligned");
_Static_assert(offsetof(struct stagehand_dma_segment, size) == 8 &&
                   offsetof(struct stagehand_dma_segment, handle) ==
                       STAGEHAND_DMA_SG_HANDLE_OFFSET,
               "stagehand_dma_segment fields are {u64 addr, u64 size, u64 handle}");

/* x0-x3 after a call. */
struct stagehand_result {
    int64_t status;
    uint64_t x1;
    uint64_t x2;
    uint64_t x3;
};

#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))

/*
 * Issues function `fn` with x1-x5 = a1-a5 (x6 zero). The hypervisor preserves every other
 * register, but SMCCC 1.1 allows a callee to clobber x4-x17, so they are declared clobbered.
 * "memory" because calls read (batch and segment arrays) or change (attributes, handles
 * written back) guest memory.
 */
static inline struct stagehand_result stagehand_call5(uint32_t fn, uint64_t a1, uint64_t a2,
                                                      uint64_t a3, uint64_t a4, uint64_t a5)
{
    register uint64_t x0 __asm__("x0") = fn;
    register uint64_t x1 __asm__("x1") = a1;
    register uint64_t x2 __asm__("x2") = a2;
    register uint64_t x3 __asm__("x3") = a3;
    register uint64_t x4 __asm__("x4") = a4;
    register uint64_t x5 __asm__("x5") = a5;
    register uint64_t x6 __asm__("x6") = 0;
    __asm__ volatile("hvc #0"
                     : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3), "+r"(x4), "+r"(x5), "+r"(x6)
                     :
                     : "x7", "x8", "x9", "x10", "x11", "x12", "x13", "x14", "x15", "x16",
                       "x17", "memory");
    struct stagehand_result result = {(int64_t)x0, x1, x2, x3};
    return result;
}

/* Issues function `fn` with x1-x3 = a1-a3 (x4-x6 zero). */
static inline struct stagehand_result stagehand_call(uint32_t fn, uint64_t a1, uint64_t a2,
                                                     uint64_t a3)
{
    return stagehand_call5(fn, a1, a2, a3, 0, 0);
}

/* FEATURES: *bits capability bits, *line D-cache line bytes, *budget bytes of work per call. */
static inline int64_t stagehand_features(uint64_t *bits, uint64_t *line, uint64_t *budget)
{
    struct stagehand_result r = stagehand_call(STAGEHAND_FN_FEATURES, 0, 0, 0);
    *bits = r.x1;
    *line = r.x2;
    *budget = r.x3;
    return r.status;
}

/* One MEM_SET_ATTR call; *done: bytes done from ipa (call again from there on INCOMPLETE). */
static inline int64_t stagehand_mem_set_attr(uint64_t ipa, uint64_t size, uint64_t attr,
                                             uint64_t *done)
{
    struct stagehand_result r = stagehand_call(STAGEHAND_FN_MEM_SET_ATTR, ipa, size, attr);
    *done = r.x1;
    return r.status;
}

/* MEM_GET_ATTR of the page holding ipa. */
static inline int64_t stagehand_mem_get_attr(uint64_t ipa, uint64_t *attr, uint64_t *flags,
                                             uint64_t *pins)
{
    struct stagehand_result r = stagehand_call(STAGEHAND_FN_MEM_GET_ATTR, ipa, 0, 0);
    *attr = r.x1;
    *flags = r.x2;
    *pins = r.x3;
    return r.status;
}

/* MEM_QUERY_VA: IPA, effective (both stages) and stage-1 attributes of a guest VA. */
static inline int64_t stagehand_mem_query_va(uint64_t va, uint64_t access, uint64_t *ipa,
                                             uint64_t *effective, uint64_t *stage1)
{
    struct stagehand_result r = stagehand_call(STAGEHAND_FN_MEM_QUERY_VA, va, access, 0);
    *ipa = r.x1;
    *effective = r.x2;
    *stage1 = r.x3;
    return r.status;
}

/* One CACHE_OP call; *done bytes done, *flags STAGEHAND_CACHE_RESULT_WIDENED or 0. */
static inline int64_t stagehand_cache_op(uint64_t addr, uint64_t size, uint64_t op,
                                         uint64_t *done, uint64_t *flags)
{
    struct stagehand_result r = stagehand_call(STAGEHAND_FN_CACHE_OP, addr, size, op);
    *done = r.x1;
    *flags = r.x2;
    return r.status;
}

/* One CACHE_OP_BATCH call; *entries_done, and *cookie to pass back on INCOMPLETE. */
static inline int64_t stagehand_cache_op_batch(uint64_t array_ipa, uint64_t count,
                                               uint64_t *cookie, uint64_t *entries_done)
{
    struct stagehand_result r =
        stagehand_call(STAGEHAND_FN_CACHE_OP_BATCH, array_ipa, count, *cookie);
    *entries_done = r.x1;
    *cookie = r.x2;
    return r.status;
}

/*
 * Repeats a range call (MEM_SET_ATTR or CACHE_OP) from where the last one stopped until
 * [start, start + size) is done. Returns SUCCESS, the first error status, or INCOMPLETE when
 * the hypervisor answered STAGEHAND_MAX_STALLED_CALLS times in a row without usable progress
 * (stagehand never does; the bound keeps a driver from spinning forever). *flags collects x2
 * of every answer.
 */
static inline int64_t stagehand_range_call(uint32_t fn, uint64_t start, uint64_t size,
                                           uint64_t arg, uint64_t *flags)
{
    unsigned stalled = 0;
    *flags = 0;
    for (;;) {
        struct stagehand_result r = stagehand_call(fn, start, size, arg);
        *flags |= r.x2;
        if (r.status != STAGEHAND_INCOMPLETE)
            return r.status;
        if (r.x1 == 0 || r.x1 >= size) {
            if (++stalled >= STAGEHAND_MAX_STALLED_CALLS)
                return STAGEHAND_INCOMPLETE;
            continue;
        }
        stalled = 0;
        start += r.x1;
        size -= r.x1;
    }
}

/* MEM_SET_ATTR over a whole range (4 KiB-aligned IPA and size). */
static inline int64_t stagehand_set_attr_range(uint64_t ipa, uint64_t size, uint64_t attr)
{
    uint64_t flags;
    return stagehand_range_call(STAGEHAND_FN_MEM_SET_ATTR, ipa, size, attr, &flags);
}

/* CACHE_OP over a whole range; *widened is set if any part was widened. */
static inline int64_t stagehand_cache_op_range(uint64_t addr, uint64_t size, uint64_t op,
                                               int *widened)
{
    uint64_t flags;
    int64_t status = stagehand_range_call(STAGEHAND_FN_CACHE_OP, addr, size, op, &flags);
    *widened = (flags & STAGEHAND_CACHE_RESULT_WIDENED) != 0;
    return status;
}

/*
 * CACHE_OP_BATCH over a whole array of `count` entries at array_ipa (8-byte aligned, contiguous
 * in IPA space), resuming with the cookie. Returns SUCCESS, the first error status, or
 * INCOMPLETE when the cookie stopped moving forward (see stagehand_range_call).
 */
static inline int64_t stagehand_cache_batch(uint64_t array_ipa, uint64_t count)
{
    uint64_t cookie = 0, previous = 0, entries_done;
    unsigned stalled = 0;
    for (;;) {
        int64_t status = stagehand_cache_op_batch(array_ipa, count, &cookie, &entries_done);
        if (status != STAGEHAND_INCOMPLETE)
            return status;
        if (cookie > previous) {
            stalled = 0;
            previous = cookie;
        } else if (++stalled >= STAGEHAND_MAX_STALLED_CALLS) {
            return STAGEHAND_INCOMPLETE;
        } else {
            cookie = previous;
        }
    }
}

/* DEV_INFO of device `index`: StreamID, PCI segment/bus/dev/fn, STAGEHAND_DEV_* flags. */
static inline int64_t stagehand_dev_info(uint64_t index, uint64_t *device, uint64_t *pci,
                                         uint64_t *flags)
{
    struct stagehand_result r = stagehand_call(STAGEHAND_FN_DEV_INFO, index, 0, 0);
    *device = r.x1;
    *pci = r.x2;
    *flags = r.x3;
    return r.status;
}

/*
 * DMA_MAP of [ipa, ipa + size) (any alignment from ABI 1.1) for `device` in `direction`;
 * *iova (= ipa) and *handle on success.
 */
static inline int64_t stagehand_dma_map(uint64_t device, uint64_t ipa, uint64_t size,
                                        uint64_t direction, uint64_t *iova, uint64_t *handle)
{
    struct stagehand_result r =
        stagehand_call5(STAGEHAND_FN_DMA_MAP, device, ipa, size, direction, 0);
    *iova = r.x1;
    *handle = r.x2;
    return r.status;
}

/* DMA_UNMAP of a handle. */
static inline int64_t stagehand_dma_unmap(uint64_t handle)
{
    return stagehand_call(STAGEHAND_FN_DMA_UNMAP, handle, 0, 0).status;
}

/* DMA_SYNC of [offset, offset + size) of a mapping for the CPU or the device. */
static inline int64_t stagehand_dma_sync(uint64_t handle, uint64_t offset, uint64_t size,
                                         uint64_t target)
{
    return stagehand_call5(STAGEHAND_FN_DMA_SYNC, handle, offset, size, target, 0).status;
}

/* One DMA_MAP_SG call; *next: segments mapped so far, *cookie to pass back on INCOMPLETE. */
static inline int64_t stagehand_dma_map_sg_call(uint64_t device, uint64_t array_ipa,
                                                uint64_t count, uint64_t direction,
                                                uint64_t *cookie, uint64_t *next)
{
    struct stagehand_result r =
        stagehand_call5(STAGEHAND_FN_DMA_MAP_SG, device, array_ipa, count, direction, *cookie);
    *next = r.x1;
    *cookie = r.x2;
    return r.status;
}

/* One DMA_UNMAP_SG call; *next: segments unmapped so far, *cookie to pass back on INCOMPLETE. */
static inline int64_t stagehand_dma_unmap_sg_call(uint64_t array_ipa, uint64_t count,
                                                  uint64_t *cookie, uint64_t *next)
{
    struct stagehand_result r =
        stagehand_call(STAGEHAND_FN_DMA_UNMAP_SG, array_ipa, count, *cookie);
    *next = r.x1;
    *cookie = r.x2;
    return r.status;
}

/*
 * DMA_MAP_SG of a whole array of `count` segments at array_ipa (8-byte aligned, contiguous in
 * IPA space), resuming with the cookie; each segment's handle is written into it. On an error,
 * the segments before *mapped stay mapped: unmap them with stagehand_dma_unmap_sg(array_ipa,
 * *mapped) (Linux's dma_map_sg must leave nothing mapped when it fails).
 */
static inline int64_t stagehand_dma_map_sg(uint64_t device, uint64_t array_ipa, uint64_t count,
                                           uint64_t direction, uint64_t *mapped)
{
    uint64_t cookie = 0;
    unsigned stalled = 0;
    *mapped = 0;
    for (;;) {
        uint64_t next;
        int64_t status =
            stagehand_dma_map_sg_call(device, array_ipa, count, direction, &cookie, &next);
        if (next > *mapped) {
            *mapped = next;
            stalled = 0;
        } else if (status == STAGEHAND_INCOMPLETE &&
                   ++stalled >= STAGEHAND_MAX_STALLED_CALLS) {
            return STAGEHAND_INCOMPLETE;
        }
        if (status != STAGEHAND_INCOMPLETE)
            return status;
    }
}

/* DMA_UNMAP_SG of the first `count` segments of an array DMA_MAP_SG filled in. */
static inline int64_t stagehand_dma_unmap_sg(uint64_t array_ipa, uint64_t count)
{
    uint64_t cookie = 0, done = 0;
    unsigned stalled = 0;
    for (;;) {
        uint64_t next;
        int64_t status = stagehand_dma_unmap_sg_call(array_ipa, count, &cookie, &next);
        if (next > done) {
            done = next;
            stalled = 0;
        } else if (status == STAGEHAND_INCOMPLETE &&
                   ++stalled >= STAGEHAND_MAX_STALLED_CALLS) {
            return STAGEHAND_INCOMPLETE;
        }
        if (status != STAGEHAND_INCOMPLETE)
            return status;
    }
}

#endif /* __aarch64__ */

#endif /* STAGEHAND_H */
