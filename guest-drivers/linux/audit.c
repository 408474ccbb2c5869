// SPDX-License-Identifier: (GPL-2.0 OR MIT)
/*
 * debugfs: stagehand/audit (the hypervisor's audit ring through AUDIT_READ, one line per
 * record in the host stream's format, which audit-report reads), stagehand/counters and
 * stagehand/devices.
 */
#include <linux/debugfs.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/unaligned/packed_struct.h>

#include "stagehand_kmod.h"

#define SH_RECORD 128

static struct dentry *sh_debugfs;

/* A page of records read with one AUDIT_READ: records base .. base + count - 1. */
struct sh_audit_iter {
	u8 *buf;
	u64 base;
	u64 count;
};

static u64 rd64(const u8 *r, unsigned int off) { return __get_unaligned_cpu64(r + off); }
static u32 rd32(const u8 *r, unsigned int off) { return __get_unaligned_cpu32(r + off); }
static u16 rd16(const u8 *r, unsigned int off) { return __get_unaligned_cpu16(r + off); }

/* Record `pos`, read from the hypervisor when the page does not hold it; NULL past the end.
 * A record lost from the ring is skipped: *pos moves to the oldest one held. */
static void *sh_audit_fetch(struct sh_audit_iter *it, loff_t *pos)
{
	u64 want = *pos;
	struct sh_ret r;

	if (it->count && want >= it->base && want < it->base + it->count)
		return it->buf + (want - it->base) * SH_RECORD;
	r = sh_call(STAGEHAND_FN_AUDIT_READ, virt_to_phys(it->buf), PAGE_SIZE, want, 0, 0);
	if (r.status != STAGEHAND_SUCCESS || r.x1 == 0) {
		sh_count_refusal(r.status);
		it->count = 0;
		return NULL;
	}
	it->base = rd64(it->buf, 0x08);
	it->count = r.x1;
	if (it->base > want)
		*pos = it->base;
	return it->buf + (*pos - it->base) * SH_RECORD;
}

static void *sh_audit_start(struct seq_file *m, loff_t *pos)
{
	return sh_audit_fetch(m->private, pos);
}

static void *sh_audit_next(struct seq_file *m, void *v, loff_t *pos)
{
	++*pos;
	return sh_audit_fetch(m->private, pos);
}

static void sh_audit_stop(struct seq_file *m, void *v)
{
}

/* A one-byte enumeration by name, or in decimal when it has none (as the hypervisor writes). */
static const char *sh_name(char *spare, u8 value, const char *const *names, unsigned int count,
			   u8 none_value, const char *none_name)
{
	if (value == none_value && none_name)
		return none_name;
	if (value < count && names[value])
		return names[value];
	snprintf(spare, 4, "%u", value);
	return spare;
}

static const char *const sh_kinds[] = { NULL, "attr", "cmo", "dma-map", "dma-unmap", "dma-sync",
					"smmu-fault", "s2-fault", "refused", "guest-start",
					"guest-stop", "mark", "overflow", "filtered", "undef" };
static const char *const sh_attrs[] = { "wb", "nc" };
static const char *const sh_cmos[] = { "-", "clean", "inv", "clean-inv" };
static const char *const sh_tlbis[] = { "-", "ipa", "vmid" };
static const char *const sh_accesses[] = { "-", "read", "write", "fetch" };
static const char *const sh_dirs[] = { "bidir", "to-device", "from-device" };

static int sh_audit_show(struct seq_file *m, void *v)
{
	const u8 *r = v;
	char kind[4], old[4], new[4], cmo[4], tlbi[4], access[4], dir[4], sid[12];
	u32 stream = rd32(r, 0x48);

	if (stream == 0xffffffff)
		strscpy(sid, "-", sizeof(sid));
	else
		snprintf(sid, sizeof(sid), "0x%x", stream);
	seq_printf(m,
		   "AUDIT v%u seq=%llu t=%llu vm=%u vcpu=%u kind=%s flags=0x%x fn=0x%08x ipa=0x%llx size=0x%llx old=%s new=%s cmo=%s:%llu tlbi=%s:%u smmu=%u:0x%x sid=%s access=%s dir=%s status=%lld detail=0x%llx tag=0x%llx dropped=%llu hash=0x%016llx\n",
		   rd16(r, 0x00), rd64(r, 0x08), rd64(r, 0x10), rd16(r, 0x18), rd16(r, 0x1a),
		   sh_name(kind, r[0x02], sh_kinds, ARRAY_SIZE(sh_kinds), 0, NULL), rd32(r, 0x04),
		   rd32(r, 0x1c), rd64(r, 0x20), rd64(r, 0x28),
		   sh_name(old, r[0x30], sh_attrs, ARRAY_SIZE(sh_attrs), 0xff, "-"),
		   sh_name(new, r[0x31], sh_attrs, ARRAY_SIZE(sh_attrs), 0xff, "-"),
		   sh_name(cmo, r[0x32], sh_cmos, ARRAY_SIZE(sh_cmos), 0, NULL), rd64(r, 0x40),
		   sh_name(tlbi, r[0x33], sh_tlbis, ARRAY_SIZE(sh_tlbis), 0, NULL), rd32(r, 0x38),
		   rd32(r, 0x3c), rd16(r, 0x4c), sid,
		   sh_name(access, r[0x34], sh_accesses, ARRAY_SIZE(sh_accesses), 0, NULL),
		   sh_name(dir, r[0x35], sh_dirs, ARRAY_SIZE(sh_dirs), 0xff, "-"),
		   (long long)rd64(r, 0x50), rd64(r, 0x58), rd64(r, 0x60), rd64(r, 0x68),
		   rd64(r, 0x78));
	return 0;
}

static const struct seq_operations sh_audit_seq_ops = {
	.start = sh_audit_start,
	.next = sh_audit_next,
	.stop = sh_audit_stop,
	.show = sh_audit_show,
};

static int sh_audit_open(struct inode *inode, struct file *file)
{
	struct sh_audit_iter *it = __seq_open_private(file, &sh_audit_seq_ops, sizeof(*it));

	if (!it)
		return -ENOMEM;
	/* AUDIT_READ writes into guest RAM by IPA: a page of the linear map. */
	it->buf = (u8 *)__get_free_page(GFP_KERNEL);
	if (!it->buf) {
		seq_release_private(inode, file);
		return -ENOMEM;
	}
	return 0;
}

static int sh_audit_release(struct inode *inode, struct file *file)
{
	struct sh_audit_iter *it = ((struct seq_file *)file->private_data)->private;

	free_page((unsigned long)it->buf);
	return seq_release_private(inode, file);
}

static const struct file_operations sh_audit_fops = {
	.owner = THIS_MODULE,
	.open = sh_audit_open,
	.read = seq_read,
	.llseek = seq_lseek,
	.release = sh_audit_release,
};

static const char *const sh_status_names[SH_STATUS_SLOTS] = {
	"other", "not-supported", "not-required", "invalid-parameter", "alignment",
	"out-of-range", "denied", "busy", "no-memory", "no-device", "bad-handle",
};

static int sh_counters_show(struct seq_file *m, void *v)
{
	struct sh_counters c;
	u64 refused = 0;
	int i;

	sh_counters_sum(&c);
	seq_printf(m, "maps %llu\nunmaps %llu\nsyncs %llu\n", c.maps, c.unmaps, c.syncs);
	seq_printf(m, "sg-maps %llu\nsg-unmaps %llu\nsg-segments %llu\nsg-calls %llu\n",
		   c.sg_maps, c.sg_unmaps, c.sg_segments, c.sg_calls);
	seq_printf(m, "allocs %llu\nfrees %llu\npage-allocs %llu\npage-frees %llu\n", c.allocs,
		   c.frees, c.page_allocs, c.page_frees);
	seq_printf(m, "unknown-mappings %llu\n", c.unknown_mappings);
	seq_printf(m, "skip-sync-cleans %llu\n", c.skip_sync_cleans);
	for (i = 0; i < SH_STATUS_SLOTS; i++)
		refused += c.refused[i];
	seq_printf(m, "refused %llu\n", refused);
	for (i = 0; i < SH_STATUS_SLOTS; i++)
		seq_printf(m, "refused-%s %llu\n", sh_status_names[i], c.refused[i]);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(sh_counters);

static int sh_devices_show(struct seq_file *m, void *v)
{
	unsigned int i;

	for (i = 0; i < sh_device_count; i++) {
		struct sh_device *d = &sh_devices[i];
		struct device *dev = READ_ONCE(d->dev);

		seq_printf(m, "%04x:%02x:%02x.%x sid=0x%x %s %s live=%ld %s\n",
			   d->pci >> 16, (d->pci >> 8) & 0xff, (d->pci >> 3) & 0x1f, d->pci & 7,
			   d->stream_id, d->flags & STAGEHAND_DEV_STRICT ? "strict" : "shared",
			   sh_coherent(d) ? "coherent" : "noncoherent", READ_ONCE(d->live),
			   dev ? "bound" : "unbound");
	}
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(sh_devices);

/* Reading stagehand/selftest runs the DMA API selftest on every bound device. */
static int sh_selftest_show(struct seq_file *m, void *v)
{
	unsigned int i, bound = 0;

	mutex_lock(&sh_bind_lock);
	for (i = 0; i < sh_device_count; i++) {
		if (sh_devices[i].dev) {
			sh_selftest_api(&sh_devices[i], m);
			bound++;
		}
	}
	mutex_unlock(&sh_bind_lock);
	if (!bound)
		seq_puts(m, "no bound device\n");
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(sh_selftest);

void sh_debugfs_init(void)
{
	sh_debugfs = debugfs_create_dir("stagehand", NULL);
	debugfs_create_file("audit", 0400, sh_debugfs, NULL, &sh_audit_fops);
	debugfs_create_file("counters", 0444, sh_debugfs, NULL, &sh_counters_fops);
	debugfs_create_file("devices", 0444, sh_debugfs, NULL, &sh_devices_fops);
	debugfs_create_file("selftest", 0400, sh_debugfs, NULL, &sh_selftest_fops);
}

void sh_debugfs_exit(void)
{
	debugfs_remove_recursive(sh_debugfs);
}
