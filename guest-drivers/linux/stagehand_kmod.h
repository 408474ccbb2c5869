/* SPDX-License-Identifier: (GPL-2.0 OR MIT) */
/*
 * stagehand.ko: what the module's files share. The ABI numbers and record layouts come from
 * the project's header, stagehand.h (checked against the Rust definitions by abi/tests); the
 * calls go through the kernel's SMCCC 1.1 helper, arm_smccc_1_1_hvc().
 */
#ifndef STAGEHAND_KMOD_H
#define STAGEHAND_KMOD_H

#include <linux/arm-smccc.h>
#include <linux/atomic.h>
#include <linux/dma-direction.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/list.h>
#include <linux/spinlock.h>
#include <linux/types.h>

#include "stagehand.h"

/* x0-x3 of one call: the signed status and the three results. */
struct sh_ret {
	long status;
	u64 x1, x2, x3;
};

/* One SMCCC 1.1 fast call over HVC #0 with x1-x5 (x6 zero, as the ABI asks of unused ones). */
static inline struct sh_ret sh_call(u32 fn, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5)
{
	struct arm_smccc_res res;

	arm_smccc_1_1_hvc(fn, a1, a2, a3, a4, a5, 0, &res);
	return (struct sh_ret){ .status = (long)res.a0, .x1 = res.a1, .x2 = res.a2, .x3 = res.a3 };
}

/* Statuses counted as refusals: everything but SUCCESS, INCOMPLETE and NOT_REQUIRED. */
#define SH_STATUS_SLOTS 11 /* index -status for -1..-10; 0 for a status the ABI does not know */

/*
 * The module's counters (debugfs stagehand/counters), per CPU so that the fast path writes
 * only its own CPU's line: sh_count() adds, sh_counters_sum() reads the totals.
 */
struct sh_counters {
	u64 maps, unmaps, syncs, sg_maps, sg_unmaps, sg_segments, sg_calls;
	u64 allocs, frees, page_allocs, page_frees;
	u64 unknown_mappings; /* unmap or sync of an address the module never mapped */
	u64 skip_sync_cleans; /* cleans before an unmap with DMA_ATTR_SKIP_CPU_SYNC */
	u64 refused[SH_STATUS_SLOTS];
};
DECLARE_PER_CPU(struct sh_counters, sh_counters);
#define sh_count_add(field, n) this_cpu_add(sh_counters.field, n)
#define sh_count(field) sh_count_add(field, 1)
/* The totals over all CPUs. */
void sh_counters_sum(struct sh_counters *sum);

/* Counts a refused call (status < 0 other than NOT_REQUIRED); returns true when it was one. */
bool sh_count_refusal(long status);

struct sh_chunk;

/* A device DEV_INFO lists as strict or non-coherent: its DMA goes through the module. */
struct sh_device {
	u32 stream_id;
	u32 pci;   /* segment << 16 | bus << 8 | devfn, as DEV_INFO x2 */
	u32 flags; /* STAGEHAND_DEV_COHERENT, STAGEHAND_DEV_STRICT */
	/* The bound device while its driver is bound (set by the bus notifier), else NULL. */
	struct device *dev;
	/*
	 * Live mappings (dma.c): unmap and sync find their handle here. Under lock: the hash
	 * table keyed by the page of a mapping's first byte, the list of mappings touching more
	 * than a few pages, the free entries and the chunks they come from, the live count.
	 */
	spinlock_t lock;
	struct hlist_head *buckets; /* 1 << SH_HASH_BITS */
	struct hlist_head large, free;
	struct sh_chunk *chunks;
	long live;
};
#define SH_HASH_BITS 10

extern struct sh_device *sh_devices;
extern unsigned int sh_device_count;
extern u64 sh_ram_top; /* highest guest RAM address the kernel knows */

static inline bool sh_coherent(const struct sh_device *d)
{
	return d->flags & STAGEHAND_DEV_COHERENT;
}

/* dma.c */
extern const struct dma_map_ops sh_dma_ops;
/* The mapping table of d: set up when the device is found, freed when the module goes. */
int sh_mappings_init(struct sh_device *d);
void sh_mappings_free(struct sh_device *d);
/* Unmaps whatever the driver of d left mapped (called once its driver has gone). */
void sh_release_mappings(struct sh_device *d);
/* MEM_SET_ATTR over a page-aligned range, resuming on INCOMPLETE. */
long sh_set_attr(phys_addr_t ipa, size_t size, u64 attr);
/* The DMA_MAP_SG/DMA_UNMAP_SG selftest on device d (no DMA happens). */
int sh_selftest_sg(struct sh_device *d);

struct seq_file;
/* The DMA API selftest on bound device d (debugfs stagehand/selftest); one line to m. */
void sh_selftest_api(struct sh_device *d, struct seq_file *m);
/* Held while a device binds or unbinds; the selftest holds it so its device stays bound. */
extern struct mutex sh_bind_lock;

/* audit.c */
void sh_debugfs_init(void);
void sh_debugfs_exit(void);

#endif
