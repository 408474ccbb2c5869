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
/*
 * A request header the device reads and a status byte it writes, in one page, then a
 * two-segment data list: what virtio-blk's driver maps for one request.
 */
int64_t block_request(uint64_t device, uint64_t header_ipa, uint64_t status_ipa,
                      struct stagehand_dma_segment *data, uint64_t data_ipa);
int64_t block_request(uint64_t device, uint64_t header_ipa, uint64_t status_ipa,
                      struct stagehand_dma_segment *data, uint64_t data_ipa)
{
    uint64_t iova, header, status, mapped;
    int64_t r = stagehand_dma_map(device, header_ipa, 16, STAGEHAND_DMA_TO_DEVICE, &iova, &header);
    if (r != STAGEHAND_SUCCESS)
        return r;
    r = stagehand_dma_map(device, status_ipa, 1, STAGEHAND_DMA_FROM_DEVICE, &iova, &status);
    if (r == STAGEHAND_SUCCESS) {
        r = stagehand_dma_map_sg(device, data_ipa, 2, STAGEHAND_DMA_FROM_DEVICE, &mapped);
        if (mapped > 0)
            (void)stagehand_dma_unmap_sg(data_ipa, mapped);
        (void)stagehand_dma_sync(status, 0, 1, STAGEHAND_DMA_SYNC_FOR_CPU);
        (void)stagehand_dma_unmap(status);
    }
    (void)data;
    (void)stagehand_dma_unmap(header);
    return r;
}

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
