// SPDX-License-Identifier: (GPL-2.0 OR MIT)
/*
 * The dma_map_ops the module installs on strict or non-coherent devices: every buffer Linux
 * maps for such a device becomes a stagehand DMA mapping (DMA_MAP, DMA_MAP_SG), which gives a
 * strict device access to exactly its pages and does a non-coherent device's cache
 * maintenance at EL2. IOVA equals IPA, which is the kernel's physical address.
 *
 * A mapping's handle must be found again at unmap and sync, which Linux identifies only by
 * address (and size and direction): each device keeps its live mappings in a hash table keyed
 * by the page of their first byte, under a spinlock (the DMA API is called from any context,
 * interrupts included). Unmap looks in one bucket. A sync may name any bytes inside a mapping:
 * it looks in the buckets of the SH_NEAR_PAGES pages at and below its address, which hold every
 * mapping that touches at most that many pages and contains it, then in the device's short list
 * of larger mappings. Entries come from per-device chunks, kept for the device's lifetime, so
 * the fast path allocates nothing. Hypercalls are made outside the lock.
 */
#include <linux/dma-map-ops.h>
#include <linux/gfp.h>
#include <linux/hash.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/perf_event.h>
#include <linux/scatterlist.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/sizes.h>

#include "stagehand_kmod.h"

/* Who owns a mapping: the DMA API call that made it. */
enum sh_kind { SH_STREAMING, SH_COHERENT, SH_PAGES };

struct sh_mapping {
	struct hlist_node node;       /* in its bucket of the device's table, or on the free list */
	struct hlist_node large_node; /* on the device's list of large mappings, if it is one */
	u64 start, size;              /* IOVA and bytes */
	u64 handle;
	u8 dir;
	u8 kind;
	bool large; /* on the large list: decided once, at insert, not recomputed at removal */
};

/* Entries are allocated this many at a time (a chunk fits in 4 KiB) and never freed while the
 * device is served. */
#define SH_CHUNK_ENTRIES ((4096 - sizeof(void *)) / sizeof(struct sh_mapping))
struct sh_chunk {
	struct sh_chunk *next;
	struct sh_mapping entries[SH_CHUNK_ENTRIES];
};

/* A mapping touching more pages than this is large: a sync looks for it in the large list. */
#define SH_NEAR_PAGES 16

/* Largest buffer one mapping may hold (the hypervisor's limit, docs/abi.md). */
#define SH_MAX_MAPPING SZ_16M

/*
 * The helpers of the map and unmap paths are __always_inline: sh_map_page and sh_unmap_page
 * then each run as one function, without the nested call frames, register spills and pointer
 * authentication of five levels of calls (45 EL1 instructions a pair, by the selftest).
 */
static __always_inline struct sh_device *sh_device_of(struct device *dev)
{
	unsigned int i;

	for (i = 0; i < sh_device_count; i++)
		if (READ_ONCE(sh_devices[i].dev) == dev)
			return &sh_devices[i];
	return NULL;
}

/* Linux's directions have the ABI's values; spelt out so that the two stay independent. */
static __always_inline u64 sh_direction(enum dma_data_direction dir)
{
	switch (dir) {
	case DMA_TO_DEVICE:
		return STAGEHAND_DMA_TO_DEVICE;
	case DMA_FROM_DEVICE:
		return STAGEHAND_DMA_FROM_DEVICE;
	default:
		return STAGEHAND_DMA_BIDIRECTIONAL;
	}
}

static __always_inline struct hlist_head *sh_bucket(struct sh_device *d, u64 addr)
{
	return &d->buckets[hash_64(addr >> PAGE_SHIFT, SH_HASH_BITS)];
}

static __always_inline bool sh_is_large(const struct sh_mapping *m)
{
	return ((m->start + m->size - 1) >> PAGE_SHIFT) - (m->start >> PAGE_SHIFT) >= SH_NEAR_PAGES;
}

/* Adds a chunk of free entries to d (any context). */
static bool sh_grow(struct sh_device *d, gfp_t gfp)
{
	struct sh_chunk *chunk = kmalloc(sizeof(*chunk), gfp);
	unsigned long flags;
	unsigned int i;

	if (!chunk)
		return false;
	spin_lock_irqsave(&d->lock, flags);
	for (i = 0; i < SH_CHUNK_ENTRIES; i++)
		hlist_add_head(&chunk->entries[i].node, &d->free);
	chunk->next = d->chunks;
	d->chunks = chunk;
	spin_unlock_irqrestore(&d->lock, flags);
	return true;
}

/* A free entry of d taken off its free list, growing it if empty; NULL without memory. */
static struct sh_mapping *sh_entry_get(struct sh_device *d)
{
	struct sh_mapping *m = NULL;
	unsigned long flags;

	do {
		spin_lock_irqsave(&d->lock, flags);
		if (!hlist_empty(&d->free)) {
			m = hlist_entry(d->free.first, struct sh_mapping, node);
			hlist_del(&m->node);
		}
		spin_unlock_irqrestore(&d->lock, flags);
	} while (!m && sh_grow(d, GFP_ATOMIC));
	return m;
}

static __always_inline void sh_insert_locked(struct sh_device *d, struct sh_mapping *m)
{
	hlist_add_head(&m->node, sh_bucket(d, m->start));
	m->large = sh_is_large(m);
	if (m->large)
		hlist_add_head(&m->large_node, &d->large);
	d->live++;
}

/* Adds m, filled in, to d's table. */
static void sh_insert(struct sh_device *d, struct sh_mapping *m)
{
	unsigned long flags;

	spin_lock_irqsave(&d->lock, flags);
	sh_insert_locked(d, m);
	spin_unlock_irqrestore(&d->lock, flags);
}

/*
 * Records a new mapping in d's table, taking a free entry; false without memory for one. The
 * fast path of DMA_MAP: one lock round trip, no allocation.
 */
static __always_inline bool sh_record(struct sh_device *d, u64 start, u64 size, u64 handle,
				       u8 dir, u8 kind)
{
	struct sh_mapping *m;
	unsigned long flags;

	for (;;) {
		spin_lock_irqsave(&d->lock, flags);
		if (!hlist_empty(&d->free))
			break;
		spin_unlock_irqrestore(&d->lock, flags);
		if (!sh_grow(d, GFP_ATOMIC))
			return false;
	}
	m = hlist_entry(d->free.first, struct sh_mapping, node);
	__hlist_del(&m->node);
	m->start = start;
	m->size = size;
	m->handle = handle;
	m->dir = dir;
	m->kind = kind;
	sh_insert_locked(d, m);
	spin_unlock_irqrestore(&d->lock, flags);
	return true;
}

/* Puts m, out of the table, back on d's free list. */
static __always_inline void sh_put_locked(struct sh_device *d, struct sh_mapping *m)
{
	hlist_add_head(&m->node, &d->free);
}

static void sh_put(struct sh_device *d, struct sh_mapping *m)
{
	unsigned long flags;

	spin_lock_irqsave(&d->lock, flags);
	sh_put_locked(d, m);
	spin_unlock_irqrestore(&d->lock, flags);
}

/*
 * Unlinks without hlist_del()'s poisoning (here and when an entry leaves the free list): the
 * entry is linked again at once, which overwrites the poison before anything could see it.
 */
static __always_inline void sh_remove_locked(struct sh_device *d, struct sh_mapping *m)
{
	__hlist_del(&m->node);
	if (m->large)
		hlist_del(&m->large_node);
	d->live--;
}

/* Removes the mapping [addr, addr + size) of direction dir; its handle, or 0 if none. */
static __always_inline u64 sh_take_locked(struct sh_device *d, u64 addr, size_t size, u8 dir)
{
	struct sh_mapping *m, *any = NULL;
	u64 handle;

	hlist_for_each_entry(m, sh_bucket(d, addr), node) {
		if (m->start != addr || m->size != size)
			continue;
		if (m->dir == dir) {
			any = m;
			break;
		}
		/* A driver that unmaps with another direction still gets its mapping back. */
		any = any ?: m;
	}
	if (!any)
		return 0;
	handle = any->handle;
	sh_remove_locked(d, any);
	sh_put_locked(d, any);
	return handle;
}

static __always_inline u64 sh_take(struct sh_device *d, u64 addr, size_t size, u8 dir)
{
	unsigned long flags;
	u64 handle;

	spin_lock_irqsave(&d->lock, flags);
	handle = sh_take_locked(d, addr, size, dir);
	spin_unlock_irqrestore(&d->lock, flags);
	if (!handle)
		sh_count(unknown_mappings);
	return handle;
}

/* A live mapping of d that contains [addr, last], or NULL. */
static struct sh_mapping *sh_find_containing_locked(struct sh_device *d, u64 addr, u64 last)
{
	u64 page = addr >> PAGE_SHIFT;
	struct sh_mapping *m;
	unsigned int i;

	for (i = 0; i < SH_NEAR_PAGES && i <= page; i++)
		hlist_for_each_entry(m, &d->buckets[hash_64(page - i, SH_HASH_BITS)], node)
			if (m->start <= addr && last <= m->start + m->size - 1)
				return m;
	hlist_for_each_entry(m, &d->large, large_node)
		if (m->start <= addr && last <= m->start + m->size - 1)
			return m;
	return NULL;
}

int sh_mappings_init(struct sh_device *d)
{
	unsigned int i;

	spin_lock_init(&d->lock);
	d->buckets = kmalloc_array(1u << SH_HASH_BITS, sizeof(*d->buckets), GFP_KERNEL);
	if (!d->buckets)
		return -ENOMEM;
	for (i = 0; i < 1u << SH_HASH_BITS; i++)
		INIT_HLIST_HEAD(&d->buckets[i]);
	INIT_HLIST_HEAD(&d->large);
	INIT_HLIST_HEAD(&d->free);
	return sh_grow(d, GFP_KERNEL) ? 0 : -ENOMEM;
}

/* Frees d's table and entries; nothing may be mapped any more. */
void sh_mappings_free(struct sh_device *d)
{
	while (d->chunks) {
		struct sh_chunk *next = d->chunks->next;

		kfree(d->chunks);
		d->chunks = next;
	}
	INIT_HLIST_HEAD(&d->free);
	kfree(d->buckets);
	d->buckets = NULL;
}

long sh_set_attr(phys_addr_t ipa, size_t size, u64 attr)
{
	/* The header's range loop: resumes after INCOMPLETE, bounded when no progress is made. */
	long status = stagehand_set_attr_range(ipa, size, attr);

	sh_count_refusal(status);
	return status;
}

/*
 * The warnings of the map and unmap paths, out of line: a local whose address is passed to
 * printk (%pa) would give the fast path a stack canary to set and check.
 */
static noinline __cold void sh_warn_map(struct sh_device *d, phys_addr_t phys, size_t size,
					long status)
{
	pr_warn_ratelimited("stagehand: DMA_MAP of %zu bytes at %pa for %s refused: %ld\n", size,
			    &phys, dev_name(d->dev), status);
}

static noinline __cold void sh_warn_unknown(struct sh_device *d, const char *what,
					    dma_addr_t addr, size_t size)
{
	pr_warn_ratelimited("stagehand: %s: %s of %zu bytes at %pad that is not mapped\n",
			    dev_name(d->dev), what, size, &addr);
}

/* DMA_MAP of [phys, phys + size) for d; the IOVA, or DMA_MAPPING_ERROR. */
static __always_inline dma_addr_t sh_map(struct sh_device *d, phys_addr_t phys, size_t size,
					 enum dma_data_direction dir, enum sh_kind kind)
{
	struct sh_ret r;

	if (!size || size > SH_MAX_MAPPING)
		return DMA_MAPPING_ERROR;
	r = sh_call(STAGEHAND_FN_DMA_MAP, d->stream_id, phys, size, sh_direction(dir), 0);
	sh_count(maps);
	if (unlikely(r.status != STAGEHAND_SUCCESS)) {
		sh_count_refusal(r.status);
		sh_warn_map(d, phys, size, r.status);
		return DMA_MAPPING_ERROR;
	}
	if (unlikely(!sh_record(d, r.x1, size, r.x2, dir, kind))) {
		/* No memory to remember it: the driver sees a refusal, the device loses access. */
		sh_count_refusal(sh_call(STAGEHAND_FN_DMA_UNMAP, r.x2, 0, 0, 0, 0).status);
		sh_count(unmaps);
		return DMA_MAPPING_ERROR;
	}
	return r.x1;
}

static __always_inline void sh_unmap(struct sh_device *d, dma_addr_t addr, size_t size,
				     enum dma_data_direction dir)
{
	u64 handle = sh_take(d, addr, size, dir);
	struct sh_ret r;

	if (unlikely(!handle)) {
		sh_warn_unknown(d, "unmap", addr, size);
		return;
	}
	r = sh_call(STAGEHAND_FN_DMA_UNMAP, handle, 0, 0, 0, 0);
	sh_count(unmaps);
	if (unlikely(r.status != STAGEHAND_SUCCESS) && sh_count_refusal(r.status))
		pr_warn_ratelimited("stagehand: DMA_UNMAP of handle %llu refused: %ld\n", handle,
				    r.status);
}

/* DMA_SYNC of [addr, addr + size), which lies in one live mapping, for the CPU or device. */
static void sh_sync(struct sh_device *d, dma_addr_t addr, size_t size, u64 target)
{
	struct sh_mapping *m;
	u64 handle = 0, offset = 0;
	unsigned long flags;
	struct sh_ret r;

	/* A coherent device needs no maintenance: the call would answer NOT_REQUIRED. */
	if (sh_coherent(d) || !size)
		return;
	spin_lock_irqsave(&d->lock, flags);
	m = sh_find_containing_locked(d, addr, addr + size - 1);
	if (m) {
		handle = m->handle;
		offset = addr - m->start;
	}
	spin_unlock_irqrestore(&d->lock, flags);
	if (!handle) {
		sh_count(unknown_mappings);
		sh_warn_unknown(d, "sync", addr, size);
		return;
	}
	r = sh_call(STAGEHAND_FN_DMA_SYNC, handle, offset, size, target, 0);
	sh_count(syncs);
	sh_count_refusal(r.status);
}

static dma_addr_t sh_map_page(struct device *dev, struct page *page, unsigned long offset,
			      size_t size, enum dma_data_direction dir, unsigned long attrs)
{
	struct sh_device *d = sh_device_of(dev);
	phys_addr_t phys = page_to_phys(page) + offset;

	if (!d || (dev->dma_mask && phys + size - 1 > *dev->dma_mask))
		return DMA_MAPPING_ERROR;
	return sh_map(d, phys, size, dir, SH_STREAMING);
}

/*
 * DMA_ATTR_SKIP_CPU_SYNC on an unmap says the CPU may have written the buffer since it took it
 * back (page_pool unmaps this way a page it hands to the network stack, whose writes must
 * survive). DMA_UNMAP of a non-coherent device's FROM_DEVICE or BIDIRECTIONAL buffer always
 * invalidates its lines, which would throw those writes away: clean the lines first, so that
 * the invalidate drops only lines memory already holds. (The IOVA is the IPA.)
 */
static void sh_clean_for_skipped_sync(struct sh_device *d, dma_addr_t addr, size_t size,
				      enum dma_data_direction dir, unsigned long attrs)
{
	int widened;

	if (likely(!(attrs & DMA_ATTR_SKIP_CPU_SYNC)) || sh_coherent(d) || dir == DMA_TO_DEVICE)
		return;
	sh_count(skip_sync_cleans);
	sh_count_refusal(stagehand_cache_op_range(addr, size, STAGEHAND_CACHE_CLEAN, &widened));
}

static void sh_unmap_page(struct device *dev, dma_addr_t addr, size_t size,
			  enum dma_data_direction dir, unsigned long attrs)
{
	struct sh_device *d = sh_device_of(dev);

	if (!d)
		return;
	sh_clean_for_skipped_sync(d, addr, size, dir, attrs);
	sh_unmap(d, addr, size, dir);
}

/* Segments per DMA_MAP_SG/DMA_UNMAP_SG array: one call's worth. */
#define SH_SG_CHUNK STAGEHAND_DMA_SG_SEGMENTS_PER_CALL

/*
 * DMA_UNMAP_SG of `count` handles, a chunk at a time through `array` (room for SH_SG_CHUNK),
 * resuming on INCOMPLETE. A handle the call refuses is unmapped alone, so that one stale
 * handle does not keep the others mapped.
 */
static void sh_unmap_handles(struct stagehand_dma_segment *array, const u64 *handles,
			     unsigned int count)
{
	unsigned int base, i;

	for (base = 0; base < count; base += SH_SG_CHUNK) {
		unsigned int n = min_t(unsigned int, count - base, SH_SG_CHUNK);
		unsigned int stalled = 0;
		u64 cookie = 0;

		for (i = 0; i < n; i++)
			array[i] = (struct stagehand_dma_segment){ .handle = handles[base + i] };
		while (cookie < n) {
			struct sh_ret r = sh_call(STAGEHAND_FN_DMA_UNMAP_SG, virt_to_phys(array),
						  n, cookie, 0, 0);

			sh_count(sg_calls);
			if (r.status == STAGEHAND_SUCCESS)
				break;
			if (r.status == STAGEHAND_INCOMPLETE) {
				if (r.x2 <= cookie && ++stalled >= STAGEHAND_MAX_STALLED_CALLS)
					break;
				cookie = max(cookie, r.x2);
				continue;
			}
			sh_count_refusal(r.status);
			/* Segment x1 stopped the list; the ones before it are unmapped. */
			cookie = r.x1 + 1;
		}
	}
}

static int sh_map_sg(struct device *dev, struct scatterlist *sgl, int nents,
		     enum dma_data_direction dir, unsigned long attrs)
{
	struct sh_device *d = sh_device_of(dev);
	struct stagehand_dma_segment *array;
	struct sh_mapping **maps;
	struct scatterlist *sg;
	unsigned int mapped = 0, i;
	int error = -EIO;
	u64 *handles;

	if (!d || nents <= 0)
		return -EINVAL;
	sh_count(sg_maps);
	array = kmalloc_array(SH_SG_CHUNK, sizeof(*array), GFP_ATOMIC);
	maps = kcalloc(nents, sizeof(*maps), GFP_ATOMIC);
	handles = kmalloc_array(nents, sizeof(*handles), GFP_ATOMIC);
	if (!array || !maps || !handles) {
		error = -ENOMEM;
		goto out;
	}
	for (i = 0; i < nents; i++) {
		maps[i] = sh_entry_get(d);
		if (!maps[i]) {
			error = -ENOMEM;
			goto out;
		}
	}

	sg = sgl;
	while (mapped < nents) {
		unsigned int n = min_t(unsigned int, nents - mapped, SH_SG_CHUNK);
		struct scatterlist *first = sg;
		unsigned int stalled = 0;
		u64 cookie = 0;
		long status;

		for (i = 0; i < n; i++, sg = sg_next(sg)) {
			phys_addr_t phys = sg_phys(sg);

			if (!sg->length || sg->length > SH_MAX_MAPPING ||
			    (dev->dma_mask && phys + sg->length - 1 > *dev->dma_mask)) {
				error = -EINVAL;
				goto unwind;
			}
			array[i] = (struct stagehand_dma_segment){ .addr = phys, .size = sg->length };
		}
		for (;;) {
			struct sh_ret r = sh_call(STAGEHAND_FN_DMA_MAP_SG, d->stream_id,
						  virt_to_phys(array), n, sh_direction(dir), cookie);

			sh_count(sg_calls);
			status = r.status;
			if (status != STAGEHAND_INCOMPLETE)
				break;
			if (r.x2 <= cookie && ++stalled >= STAGEHAND_MAX_STALLED_CALLS)
				break;
			cookie = max(cookie, r.x2);
		}
		if (status != STAGEHAND_SUCCESS) {
			sh_count_refusal(status);
			error = status == STAGEHAND_NO_MEMORY ? -ENOMEM : -EIO;
			pr_warn_ratelimited("stagehand: DMA_MAP_SG of %d segments for %s refused: %ld\n",
					    nents, dev_name(dev), status);
			/* Segments before the failing one were mapped: read their handles. */
			for (i = 0; i < n && array[i].handle; i++)
				handles[mapped + i] = array[i].handle;
			mapped += i;
			goto unwind;
		}
		for (i = 0, sg = first; i < n; i++, sg = sg_next(sg)) {
			struct sh_mapping *m = maps[mapped + i];

			handles[mapped + i] = array[i].handle;
			m->start = array[i].addr;
			m->size = array[i].size;
			m->handle = array[i].handle;
			m->dir = dir;
			m->kind = SH_STREAMING;
			sg->dma_address = array[i].addr;
			sg_dma_len(sg) = sg->length;
		}
		mapped += n;
	}
	for (i = 0; i < nents; i++)
		sh_insert(d, maps[i]);
	sh_count_add(sg_segments, nents);
	kfree(handles);
	kfree(maps);
	kfree(array);
	return nents;

unwind:
	/* dma_map_sg must leave nothing mapped when it fails. */
	if (mapped)
		sh_unmap_handles(array, handles, mapped);
out:
	if (maps)
		for (i = 0; i < nents; i++)
			if (maps[i])
				sh_put(d, maps[i]);
	kfree(handles);
	kfree(maps);
	kfree(array);
	return error;
}

static void sh_unmap_sg(struct device *dev, struct scatterlist *sgl, int nents,
			enum dma_data_direction dir, unsigned long attrs)
{
	struct sh_device *d = sh_device_of(dev);
	struct stagehand_dma_segment *array;
	struct scatterlist *sg;
	unsigned int found = 0;
	u64 *handles;
	int i;

	if (!d || nents <= 0)
		return;
	sh_count(sg_unmaps);
	for_each_sg(sgl, sg, nents, i)
		sh_clean_for_skipped_sync(d, sg_dma_address(sg), sg_dma_len(sg), dir, attrs);
	array = kmalloc_array(SH_SG_CHUNK, sizeof(*array), GFP_ATOMIC);
	handles = kmalloc_array(nents, sizeof(*handles), GFP_ATOMIC);
	if (!array || !handles) {
		/* No memory for the arrays: one DMA_UNMAP per segment instead. */
		for_each_sg(sgl, sg, nents, i)
			sh_unmap(d, sg_dma_address(sg), sg_dma_len(sg), dir);
		goto out;
	}
	for_each_sg(sgl, sg, nents, i) {
		u64 handle = sh_take(d, sg_dma_address(sg), sg_dma_len(sg), dir);

		if (handle)
			handles[found++] = handle;
	}
	sh_unmap_handles(array, handles, found);
out:
	kfree(handles);
	kfree(array);
}

static void sh_sync_single_for_cpu(struct device *dev, dma_addr_t addr, size_t size,
				   enum dma_data_direction dir)
{
	struct sh_device *d = sh_device_of(dev);

	if (d)
		sh_sync(d, addr, size, STAGEHAND_DMA_SYNC_FOR_CPU);
}

static void sh_sync_single_for_device(struct device *dev, dma_addr_t addr, size_t size,
				      enum dma_data_direction dir)
{
	struct sh_device *d = sh_device_of(dev);

	if (d)
		sh_sync(d, addr, size, STAGEHAND_DMA_SYNC_FOR_DEVICE);
}

static void sh_sync_sg(struct device *dev, struct scatterlist *sgl, int nents, u64 target)
{
	struct sh_device *d = sh_device_of(dev);
	struct scatterlist *sg;
	int i;

	if (!d)
		return;
	for_each_sg(sgl, sg, nents, i)
		sh_sync(d, sg_dma_address(sg), sg_dma_len(sg), target);
}

static void sh_sync_sg_for_cpu(struct device *dev, struct scatterlist *sgl, int nents,
			       enum dma_data_direction dir)
{
	sh_sync_sg(dev, sgl, nents, STAGEHAND_DMA_SYNC_FOR_CPU);
}

static void sh_sync_sg_for_device(struct device *dev, struct scatterlist *sgl, int nents,
				  enum dma_data_direction dir)
{
	sh_sync_sg(dev, sgl, nents, STAGEHAND_DMA_SYNC_FOR_DEVICE);
}

/*
 * Coherent memory: pages from the page allocator, made NORMAL_NC at stage 2 for a
 * non-coherent device. Stage 2 makes every alias non-cacheable, the kernel's linear map
 * included, so the linear-map address is the CPU address: no vmap of our own. Then mapped
 * for the device (a strict one reaches nothing else).
 */
static void *sh_alloc(struct device *dev, size_t size, dma_addr_t *dma_handle, gfp_t gfp,
		      unsigned long attrs)
{
	struct sh_device *d = sh_device_of(dev);
	unsigned int order = get_order(size);
	size_t span = PAGE_SIZE << order;
	struct page *page;
	phys_addr_t phys;
	dma_addr_t iova;
	long status;

	if (!d || !size)
		return NULL;
	sh_count(allocs);
	page = alloc_pages(gfp | __GFP_ZERO, order);
	if (!page)
		return NULL;
	phys = page_to_phys(page);
	if (dev->coherent_dma_mask && phys + size - 1 > dev->coherent_dma_mask)
		goto free_pages;
	if (!sh_coherent(d)) {
		status = sh_set_attr(phys, span, STAGEHAND_ATTR_NORMAL_NC);
		if (status != STAGEHAND_SUCCESS) {
			pr_warn_ratelimited("stagehand: MEM_SET_ATTR NC of %zu bytes at %pa refused: %ld\n",
					    span, &phys, status);
			/* Part of it may have become NC: make it all WB before freeing. */
			if (sh_set_attr(phys, span, STAGEHAND_ATTR_NORMAL_WB) != STAGEHAND_SUCCESS)
				return NULL; /* leak rather than hand NC pages back */
			goto free_pages;
		}
	}
	iova = sh_map(d, phys, size, DMA_BIDIRECTIONAL, SH_COHERENT);
	if (iova == DMA_MAPPING_ERROR) {
		if (!sh_coherent(d) &&
		    sh_set_attr(phys, span, STAGEHAND_ATTR_NORMAL_WB) != STAGEHAND_SUCCESS)
			return NULL;
		goto free_pages;
	}
	*dma_handle = iova;
	return page_address(page);

free_pages:
	__free_pages(page, order);
	return NULL;
}

static void sh_free(struct device *dev, size_t size, void *cpu_addr, dma_addr_t dma_handle,
		    unsigned long attrs)
{
	struct sh_device *d = sh_device_of(dev);
	unsigned int order = get_order(size);
	phys_addr_t phys = virt_to_phys(cpu_addr);
	long status;

	if (!d)
		return;
	sh_count(frees);
	/* The unmap unpins the pages; only then may their attribute change back. */
	sh_unmap(d, dma_handle, size, DMA_BIDIRECTIONAL);
	if (!sh_coherent(d)) {
		status = sh_set_attr(phys, PAGE_SIZE << order, STAGEHAND_ATTR_NORMAL_WB);
		if (status != STAGEHAND_SUCCESS) {
			pr_err_ratelimited("stagehand: %s: %zu bytes at %pa stay NC (MEM_SET_ATTR: %ld); not freed\n",
					   dev_name(dev), size, &phys, status);
			return;
		}
	}
	__free_pages(virt_to_page(cpu_addr), order);
}

/* dma_alloc_pages: cacheable pages owned by the device, handed over with the sync calls. */
static struct page *sh_alloc_pages(struct device *dev, size_t size, dma_addr_t *dma_handle,
				   enum dma_data_direction dir, gfp_t gfp)
{
	struct sh_device *d = sh_device_of(dev);
	unsigned int order = get_order(size);
	struct page *page;
	dma_addr_t iova;

	if (!d || !size)
		return NULL;
	sh_count(page_allocs);
	page = alloc_pages(gfp, order);
	if (!page)
		return NULL;
	iova = sh_map(d, page_to_phys(page), size, dir, SH_PAGES);
	if (iova == DMA_MAPPING_ERROR) {
		__free_pages(page, order);
		return NULL;
	}
	*dma_handle = iova;
	return page;
}

static void sh_free_pages(struct device *dev, size_t size, struct page *page,
			  dma_addr_t dma_handle, enum dma_data_direction dir)
{
	struct sh_device *d = sh_device_of(dev);

	if (!d)
		return;
	sh_count(page_frees);
	sh_unmap(d, dma_handle, size, dir);
	__free_pages(page, get_order(size));
}

/* Userspace mapping of coherent memory: write-combine (Normal-NC) for a non-coherent device,
 * matching what stage 2 makes of it anyway. */
static int sh_mmap(struct device *dev, struct vm_area_struct *vma, void *cpu_addr,
		   dma_addr_t dma_addr, size_t size, unsigned long attrs)
{
	struct sh_device *d = sh_device_of(dev);
	unsigned long pages = PAGE_ALIGN(size) >> PAGE_SHIFT;
	unsigned long wanted = vma_pages(vma);
	unsigned long offset = vma->vm_pgoff;

	if (!d)
		return -ENXIO;
	if (!sh_coherent(d))
		vma->vm_page_prot = pgprot_writecombine(vma->vm_page_prot);
	if (offset >= pages || wanted > pages - offset)
		return -ENXIO;
	return remap_pfn_range(vma, vma->vm_start, virt_to_pfn(cpu_addr) + offset,
			       wanted << PAGE_SHIFT, vma->vm_page_prot);
}

static int sh_get_sgtable(struct device *dev, struct sg_table *sgt, void *cpu_addr,
			  dma_addr_t dma_addr, size_t size, unsigned long attrs)
{
	int error = sg_alloc_table(sgt, 1, GFP_KERNEL);

	if (!error)
		sg_set_page(sgt->sgl, virt_to_page(cpu_addr), PAGE_ALIGN(size), 0);
	return error;
}

/* The device can be given any buffer when its mask reaches the top of guest RAM. */
static int sh_dma_supported(struct device *dev, u64 mask)
{
	return mask >= sh_ram_top;
}

static u64 sh_get_required_mask(struct device *dev)
{
	return DMA_BIT_MASK(fls64(sh_ram_top));
}

static size_t sh_max_mapping_size(struct device *dev)
{
	return SH_MAX_MAPPING;
}

const struct dma_map_ops sh_dma_ops = {
	.alloc = sh_alloc,
	.free = sh_free,
	.alloc_pages = sh_alloc_pages,
	.free_pages = sh_free_pages,
	.mmap = sh_mmap,
	.get_sgtable = sh_get_sgtable,
	.map_page = sh_map_page,
	.unmap_page = sh_unmap_page,
	.map_sg = sh_map_sg,
	.unmap_sg = sh_unmap_sg,
	.sync_single_for_cpu = sh_sync_single_for_cpu,
	.sync_single_for_device = sh_sync_single_for_device,
	.sync_sg_for_cpu = sh_sync_sg_for_cpu,
	.sync_sg_for_device = sh_sync_sg_for_device,
	.dma_supported = sh_dma_supported,
	.get_required_mask = sh_get_required_mask,
	.max_mapping_size = sh_max_mapping_size,
};

void sh_release_mappings(struct sh_device *d)
{
	unsigned long flags;
	unsigned int left = 0, i;

	for (i = 0; i < 1u << SH_HASH_BITS; i++) {
		for (;;) {
			struct sh_mapping *m = NULL;
			u64 handle = 0;

			spin_lock_irqsave(&d->lock, flags);
			if (!hlist_empty(&d->buckets[i])) {
				m = hlist_entry(d->buckets[i].first, struct sh_mapping, node);
				handle = m->handle;
				sh_remove_locked(d, m);
				sh_put_locked(d, m);
			}
			spin_unlock_irqrestore(&d->lock, flags);
			if (!m)
				break;
			left++;
			/* Coherent memory the driver never freed stays allocated (and NC): it may
			 * still be in use; only its mapping goes. */
			sh_count_refusal(sh_call(STAGEHAND_FN_DMA_UNMAP, handle, 0, 0, 0, 0).status);
		}
	}
	if (left)
		pr_warn("stagehand: %u DMA mappings left by the unbound driver unmapped\n", left);
}

/*
 * Maps three sub-page buffers over two pages (all three touch the first page, the last one
 * also the second) with one DMA_MAP_SG for device d, checks the handles and the pin counts
 * MEM_GET_ATTR reports (3 and 1), unmaps them with one DMA_UNMAP_SG and checks that the pages
 * are unpinned. No DMA happens; this checks the calls before any driver relies on them.
 */
int sh_selftest_sg(struct sh_device *d)
{
	struct stagehand_dma_segment *array;
	struct sh_ret r, first, second;
	int result = -EIO;
	u64 handles[3];
	unsigned int i;
	u8 *buf;

	buf = (u8 *)__get_free_pages(GFP_KERNEL | __GFP_ZERO, 1);
	array = kmalloc_array(3, sizeof(*array), GFP_KERNEL);
	if (!buf || !array) {
		pr_err("stagehand: selftest dma-sg: FAIL no memory\n");
		goto out;
	}
	array[0] = (struct stagehand_dma_segment){ .addr = virt_to_phys(buf + 16), .size = 100 };
	array[1] = (struct stagehand_dma_segment){ .addr = virt_to_phys(buf + 200), .size = 1 };
	array[2] = (struct stagehand_dma_segment){ .addr = virt_to_phys(buf + 4000), .size = 300 };
	r = sh_call(STAGEHAND_FN_DMA_MAP_SG, d->stream_id, virt_to_phys(array), 3,
		    STAGEHAND_DMA_BIDIRECTIONAL, 0);
	if (r.status != STAGEHAND_SUCCESS || r.x1 != 3) {
		pr_err("stagehand: selftest dma-sg: FAIL DMA_MAP_SG answered %ld, x1 %llu\n",
		       r.status, r.x1);
		goto out;
	}
	for (i = 0; i < 3; i++)
		handles[i] = array[i].handle;
	first = sh_call(STAGEHAND_FN_MEM_GET_ATTR, virt_to_phys(buf), 0, 0, 0, 0);
	second = sh_call(STAGEHAND_FN_MEM_GET_ATTR, virt_to_phys(buf + PAGE_SIZE), 0, 0, 0, 0);
	sh_unmap_handles(array, handles, 3);
	if (first.status || second.status || first.x3 != 3 || second.x3 != 1 || !handles[0] ||
	    handles[0] == handles[1] || handles[1] == handles[2] || handles[0] == handles[2]) {
		pr_err("stagehand: selftest dma-sg: FAIL pins %llu and %llu (expected 3 and 1), handles %llu %llu %llu\n",
		       first.x3, second.x3, handles[0], handles[1], handles[2]);
		goto out;
	}
	first = sh_call(STAGEHAND_FN_MEM_GET_ATTR, virt_to_phys(buf), 0, 0, 0, 0);
	second = sh_call(STAGEHAND_FN_MEM_GET_ATTR, virt_to_phys(buf + PAGE_SIZE), 0, 0, 0, 0);
	if (first.status || second.status || ((first.x2 | second.x2) & STAGEHAND_PAGE_PINNED)) {
		pr_err("stagehand: selftest dma-sg: FAIL pages still pinned after DMA_UNMAP_SG (%llu and %llu pins)\n",
		       first.x3, second.x3);
		goto out;
	}
	pr_info("stagehand: selftest dma-sg: PASS (3 segments over 2 pages: pins 3 and 1, then none)\n");
	result = 0;
out:
	kfree(array);
	if (buf)
		free_pages((unsigned long)buf, 1);
	return result;
}

/* Counters a DMA API round trip must leave as they were. */
struct sh_snapshot {
	s64 live, unknown, refused;
};

static struct sh_snapshot sh_snapshot(struct sh_device *d)
{
	struct sh_counters c;
	struct sh_snapshot s;
	int i;

	sh_counters_sum(&c);
	s = (struct sh_snapshot){ READ_ONCE(d->live), c.unknown_mappings, 0 };
	for (i = 0; i < SH_STATUS_SLOTS; i++)
		s.refused += c.refused[i];
	return s;
}

static s64 sh_syncs(void)
{
	struct sh_counters c;

	sh_counters_sum(&c);
	return c.syncs;
}

static s64 sh_skip_sync_cleans(void)
{
	struct sh_counters c;

	sh_counters_sum(&c);
	return c.skip_sync_cleans;
}

/*
 * Lets the hypervisor stream the audit records waiting: AUDIT_READ drains the log before it
 * answers, and reading from past the newest record copies nothing (docs/abi.md). The timed
 * loops start on an empty log, so none of them pays for a drain at the high water (a loop's
 * 2,000 records stay below it) and their difference is the module's cost alone.
 */
static void sh_drain_audit(void *scratch)
{
	sh_call(STAGEHAND_FN_AUDIT_READ, virt_to_phys(scratch), 128, U64_MAX, 0, 0);
}

/*
 * map+unmap pairs per timed round, and rounds of each timed loop. Short rounds, several of
 * them: QEMU's instruction count is one for all vCPUs, so a round in which another vCPU ran
 * (an idle vCPU woken, streaming this vCPU's audit records at EL2) counts its work too, and the
 * cheapest round is the one in which none did. On one vCPU every round gives the same count.
 */
#define SH_TIMED_PAIRS 500
#define SH_TIMED_ROUNDS 5

/* What the selftest times: the hypercalls alone, the module's ops, the DMA API. */
enum sh_loop { SH_LOOP_BARE, SH_LOOP_BARE_PAGE, SH_LOOP_OPS, SH_LOOP_API, SH_LOOPS };

static const char *const sh_loop_names[SH_LOOPS] = {
	"bare hypercalls", "bare page FROM_DEVICE", "module's ops", "DMA API",
};

/* The cheapest round of a loop: nanoseconds and EL1 instructions, each per pair. */
struct sh_timing {
	s64 ns, insns;
};

/*
 * EL1 instructions this task retires, from the PMU through perf (INST_RETIRED). The hypervisor
 * sets MDCR_EL2.HPMD, so nothing at EL2 is counted: unlike the clock, the count leaves out the
 * hypervisor, whose cost per call depends on the state of its audit ring (see sh_selftest_timing).
 * QEMU's TCG counts instructions only under -icount; elsewhere there is no such counter and the
 * selftest falls back to the clock.
 */
static struct perf_event *sh_insns_counter(void)
{
	struct perf_event_attr attr = {
		.type = PERF_TYPE_HARDWARE,
		.size = sizeof(attr),
		.config = PERF_COUNT_HW_INSTRUCTIONS,
		.exclude_user = 1,
		.exclude_hv = 1,
		.pinned = 1,
	};
	struct perf_event *e = perf_event_create_kernel_counter(&attr, -1, current, NULL, NULL);

	return IS_ERR(e) ? NULL : e;
}

static u64 sh_insns(struct perf_event *e)
{
	u64 enabled, running;

	return e ? perf_event_read_value(e, &enabled, &running) : 0;
}

/*
 * One round of SH_TIMED_PAIRS map+unmap pairs of kind `loop` on d over buf (256-byte buffers
 * sharing pages, 16 to a page, or one whole page), with interrupts masked so that no timer
 * tick lands in it; false if a call was refused. The round starts on a drained audit log, so
 * that its records (two a pair) stay below the high water and it pays for no stream.
 */
static bool sh_time_loop(struct sh_device *d, u8 *buf, enum sh_loop loop, struct perf_event *e,
			 s64 *ns, s64 *insns)
{
	struct device *dev = d->dev;
	u8 *page_buf = PTR_ALIGN(buf, PAGE_SIZE);
	unsigned long flags;
	bool ok = true;
	u64 count;
	ktime_t start;
	int i;

	sh_drain_audit(buf);
	count = sh_insns(e);
	local_irq_save(flags);
	start = ktime_get();
	for (i = 0; i < SH_TIMED_PAIRS && ok; i++) {
		u8 *cpu_addr = buf + (i % 32) * 256;
		struct sh_ret r;
		dma_addr_t addr;

		switch (loop) {
		case SH_LOOP_BARE:
		case SH_LOOP_BARE_PAGE:
			if (loop == SH_LOOP_BARE)
				r = sh_call(STAGEHAND_FN_DMA_MAP, d->stream_id,
					    virt_to_phys(cpu_addr), 256, STAGEHAND_DMA_TO_DEVICE, 0);
			else
				r = sh_call(STAGEHAND_FN_DMA_MAP, d->stream_id,
					    virt_to_phys(page_buf), PAGE_SIZE,
					    STAGEHAND_DMA_FROM_DEVICE, 0);
			ok = r.status == STAGEHAND_SUCCESS;
			if (ok)
				ok = sh_call(STAGEHAND_FN_DMA_UNMAP, r.x2, 0, 0, 0, 0).status ==
				     STAGEHAND_SUCCESS;
			break;
		case SH_LOOP_OPS:
			/* What the DMA API would call, less its own dispatch. */
			addr = sh_dma_ops.map_page(dev, virt_to_page(cpu_addr),
						   offset_in_page(cpu_addr), 256, DMA_TO_DEVICE, 0);
			ok = addr != DMA_MAPPING_ERROR;
			if (ok)
				sh_dma_ops.unmap_page(dev, addr, 256, DMA_TO_DEVICE, 0);
			break;
		default:
			addr = dma_map_single(dev, cpu_addr, 256, DMA_TO_DEVICE);
			ok = !dma_mapping_error(dev, addr);
			if (ok)
				dma_unmap_single(dev, addr, 256, DMA_TO_DEVICE);
			break;
		}
	}
	*ns = ktime_to_ns(ktime_sub(ktime_get(), start));
	local_irq_restore(flags);
	*insns = sh_insns(e) - count;
	return ok;
}

/* What sh_selftest_timing measured. */
struct sh_timings {
	struct sh_timing best[SH_LOOPS];
	s64 stream; /* ns streaming the last DMA API round's records, per pair */
	bool counted; /* an instruction counter was there: the insns figures are real */
};

/*
 * Times map+unmap pairs on d. Under -icount shift=0 a nanosecond is an instruction, EL2's
 * included. The module's own cost is what a pair through the DMA API (and through the module's
 * ops called directly, without Linux's dispatch) retires at EL1 beyond a bare pair of
 * hypercalls: counting at EL1 only leaves out the hypervisor, whose work per call is larger
 * once its audit ring has filled up (each record then also retires old ones), so a difference
 * of clocks charges the module with wherever in the selftest the ring happened to fill. Each
 * loop runs SH_TIMED_ROUNDS times, interleaved, and its cheapest round counts. A refused pair
 * fails the selftest (false, the loop's name in *failed).
 */
static bool sh_selftest_timing(struct sh_device *d, u8 *buf, struct sh_timings *t,
			       const char **failed)
{
	struct perf_event *e = sh_insns_counter();
	s64 ns, insns;
	ktime_t start;
	int loop, round;
	bool ok = true;

	t->counted = e;
	for (loop = 0; loop < SH_LOOPS; loop++)
		t->best[loop] = (struct sh_timing){ S64_MAX, S64_MAX };
	for (round = 0; round < SH_TIMED_ROUNDS && ok; round++) {
		for (loop = 0; loop < SH_LOOPS && ok; loop++) {
			ok = sh_time_loop(d, buf, loop, e, &ns, &insns);
			*failed = sh_loop_names[loop];
			t->best[loop].ns = min(t->best[loop].ns, ns / SH_TIMED_PAIRS);
			t->best[loop].insns = min(t->best[loop].insns, insns / SH_TIMED_PAIRS);
		}
	}
	/* What streaming the last DMA API round's records costs (two a pair; zero under audit=off). */
	start = ktime_get();
	sh_drain_audit(buf);
	t->stream = ktime_to_ns(ktime_sub(ktime_get(), start)) / SH_TIMED_PAIRS;
	if (e)
		perf_event_release_kernel(e);
	return ok;
}

static void sh_print_timings(struct seq_file *m, const struct sh_timings *t)
{
	const struct sh_timing *api = &t->best[SH_LOOP_API], *ops = &t->best[SH_LOOP_OPS];
	const struct sh_timing *bare = &t->best[SH_LOOP_BARE];

	seq_printf(m, "%d map+unmap pairs, cheapest of %d rounds: per pair %lld ns through the DMA API (%lld maps/s; %lld maps/s with their audit records streamed), %lld ns bare hypercalls, %lld ns streaming its two records; bare pair of a page FROM_DEVICE %lld ns; ",
		   SH_TIMED_PAIRS, SH_TIMED_ROUNDS, api->ns, api->ns ? NSEC_PER_SEC / api->ns : 0,
		   api->ns + t->stream ? NSEC_PER_SEC / (api->ns + t->stream) : 0, bare->ns,
		   t->stream, t->best[SH_LOOP_BARE_PAGE].ns);
	if (t->counted)
		seq_printf(m, "EL1 instructions per pair: %lld through the DMA API, %lld through the module's ops, %lld bare; the module's own %lld (%lld with Linux's DMA API dispatch)",
			   api->insns, ops->insns, bare->insns, ops->insns - bare->insns,
			   api->insns - bare->insns);
	else
		seq_printf(m, "no instruction counter (QEMU has one only under -icount); by the clock the module's own %lld ns (%lld ns with Linux's DMA API dispatch)",
			   ops->ns - bare->ns, api->ns - bare->ns);
}

#define SH_CHECK(cond, ...)                             \
	do {                                            \
		if (!(cond)) {                          \
			seq_printf(m, "FAIL " __VA_ARGS__); \
			seq_putc(m, '\n');              \
			goto out;                       \
		}                                       \
	} while (0)

/*
 * The DMA API on a bound device, through the module's ops: dma_map_single with syncs of part
 * of the buffer, dma_map_sg with sg syncs, dma_alloc_pages, dma_alloc_coherent (NC through the
 * linear map for a non-coherent device) with dma_get_sgtable, then times map+unmap pairs.
 * No DMA happens. Each step must find its mapping again, be refused nothing, and leave no
 * mapping behind. Writes one line to m.
 */
void sh_selftest_api(struct sh_device *d, struct seq_file *m)
{
	struct device *dev = d->dev;
	struct sh_snapshot before = sh_snapshot(d), after;
	s64 syncs = sh_syncs(), cleans;
	struct scatterlist sgl[3];
	struct sg_table sgt = {};
	struct page *pages = NULL;
	void *coherent = NULL;
	dma_addr_t addr, handle = 0;
	struct sh_timings timings;
	const char *failed = "";
	u8 *buf;
	int n, i;

	seq_printf(m, "%s: ", dev_name(dev));
	buf = kzalloc(3 * PAGE_SIZE, GFP_KERNEL);
	SH_CHECK(buf, "no memory");

	addr = dma_map_single(dev, buf + 100, 1000, DMA_FROM_DEVICE);
	SH_CHECK(!dma_mapping_error(dev, addr), "dma_map_single refused");
	SH_CHECK(addr == virt_to_phys(buf + 100), "IOVA %pad is not the IPA", &addr);
	dma_sync_single_for_cpu(dev, addr + 10, 100, DMA_FROM_DEVICE);
	dma_sync_single_for_device(dev, addr, 1000, DMA_FROM_DEVICE);
	dma_unmap_single(dev, addr, 1000, DMA_FROM_DEVICE);

	/*
	 * A CPU write after the buffer was taken back, then an unmap that skips the sync: for a
	 * non-coherent device the module cleans the buffer before DMA_UNMAP invalidates it (a
	 * refused clean fails the refusal count below).
	 */
	cleans = sh_skip_sync_cleans();
	addr = dma_map_single_attrs(dev, buf + 100, 1000, DMA_FROM_DEVICE, DMA_ATTR_SKIP_CPU_SYNC);
	SH_CHECK(!dma_mapping_error(dev, addr), "dma_map_single_attrs refused");
	dma_sync_single_for_cpu(dev, addr, 1000, DMA_FROM_DEVICE);
	buf[200] = 0x5a;
	dma_unmap_single_attrs(dev, addr, 1000, DMA_FROM_DEVICE, DMA_ATTR_SKIP_CPU_SYNC);
	SH_CHECK(sh_skip_sync_cleans() == cleans + !sh_coherent(d),
		 "%lld cleans before an unmap that skips the sync, expected %d",
		 sh_skip_sync_cleans() - cleans, !sh_coherent(d));

	sg_init_table(sgl, 3);
	sg_set_buf(&sgl[0], buf + 8, 64);
	sg_set_buf(&sgl[1], buf + 72, 2000);
	sg_set_buf(&sgl[2], buf + 2 * PAGE_SIZE + 1, 4000);
	n = dma_map_sg(dev, sgl, 3, DMA_BIDIRECTIONAL);
	SH_CHECK(n == 3, "dma_map_sg mapped %d of 3", n);
	for (i = 0; i < 3; i++)
		SH_CHECK(sg_dma_address(&sgl[i]) == sg_phys(&sgl[i]) &&
				 sg_dma_len(&sgl[i]) == sgl[i].length,
			 "segment %d at %pad", i, &sg_dma_address(&sgl[i]));
	dma_sync_sg_for_cpu(dev, sgl, 3, DMA_BIDIRECTIONAL);
	dma_sync_sg_for_device(dev, sgl, 3, DMA_BIDIRECTIONAL);
	dma_unmap_sg(dev, sgl, 3, DMA_BIDIRECTIONAL);
	if (!sh_coherent(d))
		SH_CHECK(sh_syncs() == syncs + 9, "%lld DMA_SYNC calls, expected 9",
			 sh_syncs() - syncs);

	pages = dma_alloc_pages(dev, 2 * PAGE_SIZE, &handle, DMA_TO_DEVICE, GFP_KERNEL);
	SH_CHECK(pages, "dma_alloc_pages refused");
	dma_sync_single_for_device(dev, handle + PAGE_SIZE, 16, DMA_TO_DEVICE);
	dma_free_pages(dev, 2 * PAGE_SIZE, pages, handle, DMA_TO_DEVICE);

	coherent = dma_alloc_coherent(dev, 5000, &handle, GFP_KERNEL);
	SH_CHECK(coherent, "dma_alloc_coherent refused");
	if (!sh_coherent(d)) {
		struct sh_ret r = sh_call(STAGEHAND_FN_MEM_QUERY_VA, (u64)coherent + 4096,
					  STAGEHAND_ACCESS_WRITE, 0, 0, 0);

		SH_CHECK(r.status == 0 && r.x2 == STAGEHAND_MAIR_NORMAL_NC,
			 "coherent memory's linear map: MEM_QUERY_VA %ld, effective %#llx", r.status,
			 r.x2);
	}
	SH_CHECK(dma_get_sgtable(dev, &sgt, coherent, handle, 5000) == 0 &&
			 sg_page(sgt.sgl) == virt_to_page(coherent) &&
			 sgt.sgl->length == 2 * PAGE_SIZE,
		 "dma_get_sgtable");
	sg_free_table(&sgt);
	dma_free_coherent(dev, 5000, coherent, handle);
	coherent = NULL;
	{
		struct sh_ret r = sh_call(STAGEHAND_FN_MEM_GET_ATTR, handle, 0, 0, 0, 0);

		SH_CHECK(r.status == 0 && r.x1 == STAGEHAND_ATTR_NORMAL_WB &&
				 !(r.x2 & STAGEHAND_PAGE_PINNED),
			 "freed coherent memory: attribute %llu, flags %#llx", r.x1, r.x2);
	}
	SH_CHECK(sh_selftest_timing(d, buf, &timings, &failed), "timed %s pair refused", failed);
	after = sh_snapshot(d);
	SH_CHECK(after.live == before.live && after.unknown == before.unknown &&
			 after.refused == before.refused,
		 "mappings %lld -> %lld, unknown %lld -> %lld, refused %lld -> %lld", before.live,
		 after.live, before.unknown, after.unknown, before.refused, after.refused);
	seq_printf(m, "PASS map_single, sync_single, map_sg, sync_sg, alloc_pages, alloc (%s), get_sgtable; ",
		   sh_coherent(d) ? "coherent" : "NC, effective 0x44");
	sh_print_timings(m, &timings);
	seq_putc(m, '\n');
out:
	if (coherent)
		dma_free_coherent(dev, 5000, coherent, handle);
	kfree(buf);
}
