/*
 * Compiled by abi/tests/header.rs with -fsyntax-only for the host (and, where an aarch64 C
 * compiler exists, for aarch64): a small user of every part of stagehand.h.
 */
#include "stagehand.h"

_Static_assert(STAGEHAND_CACHE_CLEAN != STAGEHAND_CACHE_INVALIDATE, "distinct operations");
_Static_assert((STAGEHAND_CACHE_CLEAN_INVALIDATE & STAGEHAND_CACHE_FLAG_VA) == 0,
               "the VA flag lies outside the operation code");

/* Fills a batch entry the way a C driver would. */
void fill_entry(struct stagehand_batch_entry *entry, uint64_t va, uint64_t size);
void fill_entry(struct stagehand_batch_entry *entry, uint64_t va, uint64_t size)
{
    entry->addr = va;
    entry->size = size;
    entry->op = STAGEHAND_CACHE_CLEAN | STAGEHAND_CACHE_FLAG_VA;
    entry->reserved = 0;
}

int is_error(int64_t status);
int is_error(int64_t status)
{
    return status < STAGEHAND_SUCCESS && status >= STAGEHAND_BAD_HANDLE;
}

#if defined(__aarch64__)
/* The worked example of docs/abi.md, in C. */
int64_t ring_setup(uint64_t ring_ipa, uint64_t ring_len);
int64_t receive_prepare(uint64_t buffer_va, uint64_t len);
int64_t receive_complete(uint64_t buffer_va, uint64_t len);

/* Once: the descriptor ring becomes non-cacheable in every alias. */
int64_t ring_setup(uint64_t ring_ipa, uint64_t ring_len)
{
    return stagehand_set_attr_range(ring_ipa, ring_len, STAGEHAND_ATTR_NORMAL_NC);
}

/* Before the device writes the buffer: no dirty line may be left to be evicted over its data. */
int64_t receive_prepare(uint64_t buffer_va, uint64_t len)
{
    int widened;
    return stagehand_cache_op_range(buffer_va, len,
                                    STAGEHAND_CACHE_CLEAN_INVALIDATE | STAGEHAND_CACHE_FLAG_VA,
                                    &widened);
}

/* After the device has written it: drop what the CPU fetched meanwhile, writing nothing back. */
int64_t receive_complete(uint64_t buffer_va, uint64_t len)
{
    int widened;
    return stagehand_cache_op_range(buffer_va, len,
                                    STAGEHAND_CACHE_INVALIDATE | STAGEHAND_CACHE_FLAG_VA, &widened);
}
#endif
