/*
 * stagehand.h: the stagehand hypercall ABI, version 1.0, for C guest drivers.
 *
 * The values are those of the Rust crate `stagehand-abi` (abi/src/lib.rs); a host test of that
 * crate (abi/tests/header.rs) parses every #define below and compares it with the Rust
 * constant of the same meaning, so the two cannot drift apart. See docs/abi.md for the
 * semantics of each call.
 *
 * Calling convention: SMCCC 1.1 fast calls over HVC #0. Function ID in w0, arguments in x1-x6,
 * a signed status back in x0, results in x1-x3. Addresses are IPAs unless the VA flag says
 * otherwise; sizes are in bytes. The HVC wrappers exist only when compiling for aarch64
 * (GCC or Clang); everything else is plain C11.
 */
#ifndef STAGEHAND_H
#define STAGEHAND_H

#include <stddef.h>
#include <stdint.h>

/* ABI version (REVISION: x0 major, x1 minor). */
#define STAGEHAND_ABI_MAJOR 1
#define STAGEHAND_ABI_MINOR 0

/* CALL_UID answer, a61eba14-6d38-495c-9e88-7830b073fe65, as w0-w3. */
#define STAGEHAND_UUID_W0 0x14ba1ea6u
#define STAGEHAND_UUID_W1 0x5c49386du
#define STAGEHAND_UUID_W2 0x3078889eu
#define STAGEHAND_UUID_W3 0x65fe73b0u

/* Function IDs (w0). */
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

/* x0-x3 after a call. */
struct stagehand_result {
    int64_t status;
    uint64_t x1;
    uint64_t x2;
    uint64_t x3;
};

#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))

/*
 * Issues function `fn` with x1-x3 = a1-a3 (x4-x6 zero). The hypervisor preserves every other
 * register, but SMCCC 1.1 allows a callee to clobber x4-x17, so they are declared clobbered.
 * "memory" because calls read (batch array) or change (attributes) guest memory.
 */
static inline struct stagehand_result stagehand_call(uint32_t fn, uint64_t a1, uint64_t a2,
                                                     uint64_t a3)
{
    register uint64_t x0 __asm__("x0") = fn;
    register uint64_t x1 __asm__("x1") = a1;
    register uint64_t x2 __asm__("x2") = a2;
    register uint64_t x3 __asm__("x3") = a3;
    register uint64_t x4 __asm__("x4") = 0;
    register uint64_t x5 __asm__("x5") = 0;
    register uint64_t x6 __asm__("x6") = 0;
    __asm__ volatile("hvc #0"
                     : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3), "+r"(x4), "+r"(x5), "+r"(x6)
                     :
                     : "x7", "x8", "x9", "x10", "x11", "x12", "x13", "x14", "x15", "x16",
                       "x17", "memory");
    struct stagehand_result result = {(int64_t)x0, x1, x2, x3};
    return result;
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

#endif /* __aarch64__ */

#endif /* STAGEHAND_H */
