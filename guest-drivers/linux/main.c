// SPDX-License-Identifier: (GPL-2.0 OR MIT)
/*
 * stagehand.ko: routes Linux's DMA API through the stagehand hypervisor for the PCI devices
 * it declares strict or non-coherent.
 *
 * At load: finds the hypervisor (device-tree node "stagehand,hypervisor" and CALL_UID over an
 * HVC conduit, else refuses with -ENODEV), asks DEV_INFO which devices need the module, runs a
 * selftest and registers a PCI bus notifier. When a driver binds to one of those devices
 * (BUS_NOTIFY_BIND_DRIVER: after dma_configure(), before probe()), the module installs its
 * dma_map_ops on it and holds a module reference until the driver unbinds, so it cannot be
 * unloaded while a device uses it. It must be loaded before the devices' drivers bind.
 */
#include <linux/arm-smccc.h>
#include <linux/device.h>
#include <linux/dma-map-ops.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/of.h>
#include <linux/pci.h>
#include <linux/slab.h>

#include "stagehand_kmod.h"

DEFINE_PER_CPU(struct sh_counters, sh_counters);

void sh_counters_sum(struct sh_counters *sum)
{
	unsigned int cpu, i;

	memset(sum, 0, sizeof(*sum));
	for_each_possible_cpu(cpu) {
		const u64 *one = (const u64 *)per_cpu_ptr(&sh_counters, cpu);
		u64 *total = (u64 *)sum;

		for (i = 0; i < sizeof(*sum) / sizeof(u64); i++)
			total[i] += READ_ONCE(one[i]);
	}
}
struct sh_device *sh_devices;
unsigned int sh_device_count;
u64 sh_ram_top;

/* Serialises the notifier's bind and unbind work. */
DEFINE_MUTEX(sh_bind_lock);

/* More devices than DEV_INFO could list on a PCI segment. */
#define SH_MAX_DEV_INFO 4096

bool sh_count_refusal(long status)
{
	if (status == STAGEHAND_SUCCESS || status == STAGEHAND_INCOMPLETE ||
	    status == STAGEHAND_NOT_REQUIRED)
		return false;
	if (status < 0 && status >= -(long)(SH_STATUS_SLOTS - 1))
		sh_count(refused[-status]);
	else
		sh_count(refused[0]);
	return true;
}

/* The hypervisor is stagehand: its device-tree node, an HVC conduit, and its CALL_UID. */
static int sh_find_hypervisor(void)
{
	struct device_node *node;
	u32 version[2] = { 0, 0 };
	struct sh_ret r;

	node = of_find_compatible_node(NULL, NULL, "stagehand,hypervisor");
	if (!node) {
		pr_err("stagehand: not loading: no stagehand hypervisor (no \"stagehand,hypervisor\" device-tree node)\n");
		return -ENODEV;
	}
	of_property_read_u32_array(node, "abi-version", version, 2);
	of_node_put(node);
	/* Only an HVC conduit is known to reach a hypervisor: without EL2 an HVC is UNDEFINED. */
	if (arm_smccc_1_1_get_conduit() != SMCCC_CONDUIT_HVC) {
		pr_err("stagehand: not loading: the SMCCC conduit is not HVC, so no hypervisor answers calls\n");
		return -ENODEV;
	}
	r = sh_call(STAGEHAND_FN_CALL_UID, 0, 0, 0, 0, 0);
	if ((u32)r.status != STAGEHAND_UUID_W0 || (u32)r.x1 != STAGEHAND_UUID_W1 ||
	    (u32)r.x2 != STAGEHAND_UUID_W2 || (u32)r.x3 != STAGEHAND_UUID_W3) {
		pr_err("stagehand: not loading: CALL_UID is not stagehand's (w0 %#x), though the device tree names it\n",
		       (u32)r.status);
		return -ENODEV;
	}
	r = sh_call(STAGEHAND_FN_REVISION, 0, 0, 0, 0, 0);
	if (r.status != STAGEHAND_ABI_MAJOR || r.x1 < 1) {
		pr_err("stagehand: not loading: ABI %ld.%llu (device tree %u.%u); this module needs 1.1 or later 1.x\n",
		       r.status, r.x1, version[0], version[1]);
		return -ENODEV;
	}
	pr_info("stagehand: hypervisor found, ABI %ld.%llu\n", r.status, r.x1);
	return 0;
}

/* Reads DEV_INFO from index 0 and keeps the devices that are strict or non-coherent. */
static int sh_read_devices(void)
{
	unsigned int index, kept = 0;

	for (index = 0; index < SH_MAX_DEV_INFO; index++) {
		struct sh_ret r = sh_call(STAGEHAND_FN_DEV_INFO, index, 0, 0, 0, 0);

		if (r.status != STAGEHAND_SUCCESS)
			break;
		if ((r.x3 & STAGEHAND_DEV_STRICT) || !(r.x3 & STAGEHAND_DEV_COHERENT))
			kept++;
	}
	if (!kept)
		return 0;
	sh_devices = kcalloc(kept, sizeof(*sh_devices), GFP_KERNEL);
	if (!sh_devices)
		return -ENOMEM;
	for (index = 0; index < SH_MAX_DEV_INFO && sh_device_count < kept; index++) {
		struct sh_ret r = sh_call(STAGEHAND_FN_DEV_INFO, index, 0, 0, 0, 0);
		struct sh_device *d;

		if (r.status != STAGEHAND_SUCCESS)
			break;
		if (!(r.x3 & STAGEHAND_DEV_STRICT) && (r.x3 & STAGEHAND_DEV_COHERENT))
			continue;
		d = &sh_devices[sh_device_count++];
		d->stream_id = r.x1;
		d->pci = r.x2;
		d->flags = r.x3;
		if (sh_mappings_init(d))
			return -ENOMEM;
		pr_info("stagehand: device %04x:%02x:%02x.%x StreamID %#x: %s, %s\n",
			d->pci >> 16, (d->pci >> 8) & 0xff, PCI_SLOT(d->pci & 0xff),
			PCI_FUNC(d->pci & 0xff), d->stream_id,
			d->flags & STAGEHAND_DEV_STRICT ? "strict" : "shared",
			sh_coherent(d) ? "coherent" : "non-coherent");
	}
	return 0;
}

static struct sh_device *sh_device_of_pci(struct pci_dev *pdev)
{
	u32 pci = (u32)pci_domain_nr(pdev->bus) << 16 | pdev->bus->number << 8 | pdev->devfn;
	unsigned int i;

	for (i = 0; i < sh_device_count; i++)
		if (sh_devices[i].pci == pci)
			return &sh_devices[i];
	return NULL;
}

static int sh_pci_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	struct device *dev = data;
	struct sh_device *d = sh_device_of_pci(to_pci_dev(dev));

	if (!d)
		return NOTIFY_DONE;
	mutex_lock(&sh_bind_lock);
	switch (action) {
	case BUS_NOTIFY_BIND_DRIVER:
		if (d->dev) {
			dev_warn(dev, "stagehand: already bound\n");
		} else if (!try_module_get(THIS_MODULE)) {
			dev_err(dev, "stagehand: module unloading; its DMA does not go through stagehand\n");
		} else {
			WRITE_ONCE(d->dev, dev);
			set_dma_ops(dev, &sh_dma_ops);
			dev_info(dev, "stagehand: DMA through the hypervisor (StreamID %#x)\n",
				 d->stream_id);
		}
		break;
	case BUS_NOTIFY_UNBOUND_DRIVER:
	case BUS_NOTIFY_DRIVER_NOT_BOUND:
		if (d->dev == dev) {
			/* The kernel's teardown normally cleared them already. */
			if (get_dma_ops(dev) == &sh_dma_ops)
				set_dma_ops(dev, NULL);
			sh_release_mappings(d);
			WRITE_ONCE(d->dev, NULL);
			module_put(THIS_MODULE);
			dev_info(dev, "stagehand: driver gone, device released\n");
		}
		break;
	}
	mutex_unlock(&sh_bind_lock);
	return NOTIFY_OK;
}

static struct notifier_block sh_pci_notifier = {
	.notifier_call = sh_pci_notify,
};

/* Devices whose driver bound before the module loaded keep the kernel's DMA ops: say so. */
static void sh_warn_already_bound(void)
{
	unsigned int i;

	for (i = 0; i < sh_device_count; i++) {
		struct sh_device *d = &sh_devices[i];
		struct pci_dev *pdev = pci_get_domain_bus_and_slot(d->pci >> 16, (d->pci >> 8) & 0xff,
								   d->pci & 0xff);

		if (!pdev)
			continue;
		if (pdev->dev.driver)
			pci_warn(pdev, "stagehand: driver %s bound before the module loaded: its DMA does not go through stagehand (load stagehand.ko first)\n",
				 pdev->dev.driver->name);
		pci_dev_put(pdev);
	}
}

/*
 * Selftest: a page made NORMAL_NC with MEM_SET_ATTR is non-cacheable through the kernel's
 * linear map too (MEM_QUERY_VA effective 0x44), which is why coherent allocations need no
 * remap; and back to 0xff after MEM_SET_ATTR WB. Prints one "selftest nc-alias" line.
 */
static int sh_selftest_nc_alias(void)
{
	u8 effective[3] = { 0, 0, 0 };
	u64 stage1 = 0;
	unsigned long va;
	phys_addr_t ipa;
	long status = 0;
	int step, i, result = -EIO;

	va = __get_free_page(GFP_KERNEL);
	if (!va) {
		pr_err("stagehand: selftest nc-alias: FAIL no page\n");
		return -ENOMEM;
	}
	ipa = virt_to_phys((void *)va);
	memset((void *)va, 0x5a, PAGE_SIZE);
	for (step = 0; step < 3; step++) {
		struct sh_ret r;

		if (step == 1)
			status = sh_set_attr(ipa, PAGE_SIZE, STAGEHAND_ATTR_NORMAL_NC);
		else if (step == 2)
			status = sh_set_attr(ipa, PAGE_SIZE, STAGEHAND_ATTR_NORMAL_WB);
		if (status != STAGEHAND_SUCCESS) {
			pr_err("stagehand: selftest nc-alias: FAIL MEM_SET_ATTR step %d: %ld\n", step,
			       status);
			goto out;
		}
		r = sh_call(STAGEHAND_FN_MEM_QUERY_VA, va, STAGEHAND_ACCESS_READ, 0, 0, 0);
		if (r.status != STAGEHAND_SUCCESS || r.x1 != ipa) {
			pr_err("stagehand: selftest nc-alias: FAIL MEM_QUERY_VA of %#lx: %ld, IPA %#llx (expected %pa)\n",
			       va, r.status, r.x1, &ipa);
			goto out;
		}
		effective[step] = r.x2;
		stage1 = r.x3;
	}
	for (i = 0; i < PAGE_SIZE; i++)
		if (((u8 *)va)[i] != 0x5a)
			break;
	if (effective[0] != STAGEHAND_MAIR_NORMAL_WB || effective[1] != STAGEHAND_MAIR_NORMAL_NC ||
	    effective[2] != STAGEHAND_MAIR_NORMAL_WB || i != PAGE_SIZE) {
		pr_err("stagehand: selftest nc-alias: FAIL linear map effective %#x -> %#x -> %#x, data %s\n",
		       effective[0], effective[1], effective[2], i == PAGE_SIZE ? "kept" : "changed");
		goto out;
	}
	pr_info("stagehand: selftest nc-alias: PASS linear-map alias effective %#x -> %#x -> %#x (stage 1 %#llx)\n",
		effective[0], effective[1], effective[2], stage1);
	result = 0;
out:
	/* A page left NC is not handed back to the allocator. */
	if (result == 0 || sh_set_attr(ipa, PAGE_SIZE, STAGEHAND_ATTR_NORMAL_WB) == STAGEHAND_SUCCESS)
		free_page(va);
	return result;
}

/* Frees the devices found and their mapping tables (nothing is mapped any more). */
static void sh_free_devices(void)
{
	unsigned int i;

	for (i = 0; i < sh_device_count; i++)
		sh_mappings_free(&sh_devices[i]);
	kfree(sh_devices);
	sh_devices = NULL;
	sh_device_count = 0;
}

static int __init sh_init(void)
{
	unsigned int i;
	int error;

	error = sh_find_hypervisor();
	if (error)
		return error;
	sh_ram_top = __pa(high_memory - 1);
	error = sh_read_devices();
	if (error)
		goto fail;
	error = sh_selftest_nc_alias();
	if (error)
		goto fail;
	for (i = 0; i < sh_device_count; i++) {
		if (sh_devices[i].flags & STAGEHAND_DEV_STRICT) {
			error = sh_selftest_sg(&sh_devices[i]);
			if (error)
				goto fail;
			break;
		}
	}
	error = bus_register_notifier(&pci_bus_type, &sh_pci_notifier);
	if (error)
		goto fail;
	sh_warn_already_bound();
	sh_debugfs_init();
	pr_info("stagehand: loaded; %u device(s) routed through the hypervisor\n", sh_device_count);
	return 0;
fail:
	sh_free_devices();
	return error;
}

/* Runs only when no device holds a reference (each bound device holds one). */
static void __exit sh_exit(void)
{
	bus_unregister_notifier(&pci_bus_type, &sh_pci_notifier);
	sh_debugfs_exit();
	sh_free_devices();
	pr_info("stagehand: unloaded\n");
}

module_init(sh_init);
module_exit(sh_exit);

MODULE_LICENSE("Dual MIT/GPL");
MODULE_DESCRIPTION("Routes the DMA API of strict or non-coherent PCI devices through the stagehand hypervisor");
