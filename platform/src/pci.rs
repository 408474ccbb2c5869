//! PCI configuration space: addresses (bus/device/function, requester IDs, ECAM offsets), the
//! parsing of type 0 and type 1 headers, a bus scan over any configuration-space reader, and the
//! requester ID to StreamID translation of a host bridge's `iommu-map`.
//!
//! The scan is portable: the hypervisor passes a closure that reads ECAM (MMIO), the host tests
//! a fake configuration space. Nothing here writes configuration space: BARs belong to the
//! guest, which sizes and assigns them itself.

#![forbid(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

use crate::board::IommuMapEntry;

/// Configuration-space register offsets (PCI Local Bus 3.0, section 6.1).
pub mod register {
    /// Vendor ID (16 bits) and device ID (16 bits).
    pub const ID: u16 = 0x00;
    /// Command (16 bits) and status (16 bits).
    pub const COMMAND_STATUS: u16 = 0x04;
    /// Revision (8 bits) and class code (24 bits).
    pub const CLASS_REVISION: u16 = 0x08;
    /// Cache line size, latency timer, header type, BIST.
    pub const HEADER_TYPE_DWORD: u16 = 0x0c;
    /// First base address register.
    pub const BAR0: u16 = 0x10;
    /// Type 1 header: primary, secondary and subordinate bus numbers.
    pub const BUS_NUMBERS: u16 = 0x18;
}

/// Command register bits.
pub mod command {
    /// Memory space decoding enabled.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// The function may master the bus (DMA).
    pub const BUS_MASTER: u16 = 1 << 2;
}

/// The vendor ID an absent function reads as.
pub const NO_VENDOR: u16 = 0xffff;

/// A PCI function's address on its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0-31.
    pub device: u8,
    /// Function number, 0-7.
    pub function: u8,
}

impl Bdf {
    /// The function `bus:device.function`, or `None` when device or function is out of range.
    pub const fn new(bus: u8, device: u8, function: u8) -> Option<Bdf> {
        if device < 32 && function < 8 {
            Some(Bdf {
                bus,
                device,
                function,
            })
        } else {
            None
        }
    }

    /// The requester ID: bus << 8 | device << 3 | function.
    pub const fn rid(self) -> u16 {
        (self.bus as u16) << 8 | (self.device as u16) << 3 | self.function as u16
    }

    /// The function a requester ID names.
    pub const fn from_rid(rid: u16) -> Bdf {
        Bdf {
            bus: (rid >> 8) as u8,
            device: ((rid >> 3) & 0x1f) as u8,
            function: (rid & 7) as u8,
        }
    }

    /// Offset of this function's 4 KiB of configuration space in an ECAM region whose first
    /// bus is `bus_start`; `None` when the bus lies below it.
    pub const fn ecam_offset(self, bus_start: u8) -> Option<u64> {
        if self.bus < bus_start {
            return None;
        }
        Some(
            ((self.bus - bus_start) as u64) << 20
                | (self.device as u64) << 15
                | (self.function as u64) << 12,
        )
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The layout of a function's header (header type bits 6:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderKind {
    /// Type 0: an endpoint, six BARs.
    Endpoint,
    /// Type 1: a PCI-to-PCI bridge, two BARs and bus numbers.
    Bridge,
    /// Type 2 (CardBus) or a reserved value.
    Other(u8),
}

/// A base address register, as the function holds it now (not sized: sizing writes the BAR,
/// and BARs are the guest's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// Not implemented (reads as zero) or the upper half of a 64-bit BAR.
    Unused,
    /// 32-bit memory BAR.
    Memory32 {
        /// Current address.
        address: u32,
        /// Prefetchable.
        prefetchable: bool,
    },
    /// 64-bit memory BAR (uses two slots).
    Memory64 {
        /// Current address.
        address: u64,
        /// Prefetchable.
        prefetchable: bool,
    },
    /// I/O BAR.
    Io {
        /// Current address.
        address: u32,
    },
}

/// Decodes the BAR slots of a header (`raw` holds BAR0 onwards: six for an endpoint, two for a
/// bridge). A 64-bit BAR takes its slot and the next, which reads as [`Bar::Unused`].
pub fn decode_bars(raw: &[u32]) -> Vec<Bar> {
    let mut bars = Vec::with_capacity(raw.len());
    let mut slot = 0;
    while slot < raw.len() {
        let value = raw[slot];
        if value & 1 == 1 {
            bars.push(Bar::Io {
                address: value & !0x3,
            });
        } else {
            let prefetchable = value & 0x8 != 0;
            match (value >> 1) & 0b11 {
                0b10 if slot + 1 < raw.len() => {
                    let address = (raw[slot + 1] as u64) << 32 | (value & !0xf) as u64;
                    bars.push(Bar::Memory64 {
                        address,
                        prefetchable,
                    });
                    bars.push(Bar::Unused);
                    slot += 1;
                }
                0b00 if value == 0 => bars.push(Bar::Unused),
                0b00 => bars.push(Bar::Memory32 {
                    address: value & !0xf,
                    prefetchable,
                }),
                _ => bars.push(Bar::Unused), // reserved type, or a 64-bit BAR in the last slot
            }
        }
        slot += 1;
    }
    bars
}

/// One function found by the scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base class, subclass, programming interface).
    pub class: u32,
    /// Header layout.
    pub kind: HeaderKind,
    /// Header type bit 7: the device has functions 1-7.
    pub multifunction: bool,
    /// The BARs (six for an endpoint, two for a bridge, none otherwise).
    pub bars: Vec<Bar>,
    /// A bridge's secondary bus number (0 while firmware or the guest has not assigned one).
    pub secondary_bus: Option<u8>,
}

/// Dwords of a header the parser reads (the first 64 bytes).
pub const HEADER_DWORDS: usize = 16;

impl Function {
    /// Parses the first 64 bytes of configuration space of `bdf`; `None` when no function is
    /// there (vendor ID 0xffff, or 0 as some bridges answer).
    pub fn parse(bdf: Bdf, header: &[u32; HEADER_DWORDS]) -> Option<Function> {
        let vendor = header[0] as u16;
        if vendor == NO_VENDOR || vendor == 0 {
            return None;
        }
        let header_type = (header[(register::HEADER_TYPE_DWORD / 4) as usize] >> 16) as u8;
        let kind = match header_type & 0x7f {
            0 => HeaderKind::Endpoint,
            1 => HeaderKind::Bridge,
            other => HeaderKind::Other(other),
        };
        let bar0 = (register::BAR0 / 4) as usize;
        let bars = match kind {
            HeaderKind::Endpoint => decode_bars(&header[bar0..bar0 + 6]),
            HeaderKind::Bridge => decode_bars(&header[bar0..bar0 + 2]),
            HeaderKind::Other(_) => Vec::new(),
        };
        let secondary_bus = match kind {
            HeaderKind::Bridge => Some((header[(register::BUS_NUMBERS / 4) as usize] >> 8) as u8),
            _ => None,
        };
        Some(Function {
            bdf,
            vendor,
            device: (header[0] >> 16) as u16,
            class: header[(register::CLASS_REVISION / 4) as usize] >> 8,
            kind,
            multifunction: header_type & 0x80 != 0,
            bars,
            secondary_bus,
        })
    }
}

/// Scans buses `bus_start..=bus_end`, starting at `bus_start` and following bridges whose
/// secondary bus is already assigned (inside the range, each bus once). `read(bdf, offset)`
/// returns the 32-bit configuration register at `offset` of `bdf`. At most 32 × 8 functions
/// per bus are probed; functions 1-7 only of multi-function devices.
pub fn scan(bus_start: u8, bus_end: u8, mut read: impl FnMut(Bdf, u16) -> u32) -> Vec<Function> {
    let mut found = Vec::new();
    let mut visited = [false; 256];
    let mut pending = Vec::from([bus_start]);
    while let Some(bus) = pending.pop() {
        if visited[bus as usize] || bus < bus_start || bus > bus_end {
            continue;
        }
        visited[bus as usize] = true;
        for device in 0..32 {
            for function in 0..8 {
                let Some(bdf) = Bdf::new(bus, device, function) else {
                    continue;
                };
                if read(bdf, register::ID) as u16 == NO_VENDOR {
                    if function == 0 {
                        break;
                    }
                    continue;
                }
                let mut header = [0u32; HEADER_DWORDS];
                for (index, dword) in header.iter_mut().enumerate() {
                    *dword = read(bdf, (index * 4) as u16);
                }
                let Some(parsed) = Function::parse(bdf, &header) else {
                    if function == 0 {
                        break;
                    }
                    continue;
                };
                let single = function == 0 && !parsed.multifunction;
                if let Some(secondary) = parsed.secondary_bus.filter(|&b| b > bus) {
                    pending.push(secondary);
                }
                found.push(parsed);
                if single {
                    break;
                }
            }
        }
    }
    found.sort_by_key(|f| f.bdf);
    found
}

/// The StreamID of requester `rid` through a host bridge's `iommu-map`, or `None` when no entry
/// covers it (the device's DMA does not go through the IOMMU).
pub fn stream_id(map: &[IommuMapEntry], rid: u16) -> Option<u32> {
    let rid = rid as u32;
    map.iter().find_map(|entry| {
        let offset = rid.checked_sub(entry.rid_base)?;
        (offset < entry.length).then(|| entry.sid_base + offset)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::format;

    #[test]
    fn bdf_rid_and_ecam() {
        let edu = Bdf::new(0, 2, 0).unwrap();
        assert_eq!(edu.rid(), 0x10);
        assert_eq!(Bdf::from_rid(0x10), edu);
        assert_eq!(format!("{edu}"), "00:02.0");
        let far = Bdf::new(0x12, 0x1f, 7).unwrap();
        assert_eq!(far.rid(), 0x12ff);
        assert_eq!(Bdf::from_rid(far.rid()), far);
        assert_eq!(format!("{far}"), "12:1f.7");
        assert_eq!(edu.ecam_offset(0), Some(0x1_0000));
        assert_eq!(
            far.ecam_offset(0x10),
            Some(0x20_0000 | 0x1f << 15 | 7 << 12)
        );
        assert_eq!(edu.ecam_offset(1), None);
        assert_eq!(Bdf::new(0, 32, 0), None);
        assert_eq!(Bdf::new(0, 0, 8), None);
    }

    #[test]
    fn bars_of_every_kind() {
        let bars = decode_bars(&[0xfeb0_0000, 0x0000_c001, 0xfe00_000c, 0x80, 0, 0]);
        assert_eq!(
            bars,
            [
                Bar::Memory32 {
                    address: 0xfeb0_0000,
                    prefetchable: false
                },
                Bar::Io { address: 0xc000 },
                Bar::Memory64 {
                    address: 0x80_fe00_0000,
                    prefetchable: true
                },
                Bar::Unused,
                Bar::Unused,
                Bar::Unused,
            ]
        );
        // A 64-bit BAR in the last slot has no upper half: unusable.
        assert_eq!(decode_bars(&[0x4]), [Bar::Unused]);
    }

    /// A fake configuration space: functions by BDF, each a 64-byte header.
    struct FakeSpace {
        headers: BTreeMap<Bdf, [u32; HEADER_DWORDS]>,
        reads: usize,
    }

    impl FakeSpace {
        fn read(&mut self, bdf: Bdf, offset: u16) -> u32 {
            self.reads += 1;
            self.headers
                .get(&bdf)
                .map_or(0xffff_ffff, |h| h[offset as usize / 4])
        }
    }

    fn endpoint(vendor: u16, device: u16, class: u32, multifunction: bool) -> [u32; 16] {
        let mut h = [0; 16];
        h[0] = (device as u32) << 16 | vendor as u32;
        h[2] = class << 8 | 0x10;
        h[3] = if multifunction { 0x80 << 16 } else { 0 };
        h
    }

    fn bridge(secondary: u8) -> [u32; 16] {
        let mut h = endpoint(0x1b36, 0x000c, 0x06_0400, false);
        h[3] = 1 << 16;
        h[6] = (secondary as u32 + 2) << 16 | (secondary as u32) << 8;
        h
    }

    fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
        Bdf::new(bus, device, function).unwrap()
    }

    #[test]
    fn scans_qemu_virt_with_edu_and_a_bridge() {
        let mut space = FakeSpace {
            headers: BTreeMap::new(),
            reads: 0,
        };
        // Host bridge, edu at 00:02.0 with BAR0 assigned, a two-function device, a bridge to
        // bus 1 with one device, and a bridge the guest has not numbered yet.
        space
            .headers
            .insert(bdf(0, 0, 0), endpoint(0x1b36, 0x0008, 0x06_0000, false));
        let mut edu = endpoint(0x1234, 0x11e8, 0xff_0000, false);
        edu[4] = 0x1000_0000;
        space.headers.insert(bdf(0, 2, 0), edu);
        space
            .headers
            .insert(bdf(0, 3, 0), endpoint(0x1af4, 0x1042, 0x01_0000, true));
        space
            .headers
            .insert(bdf(0, 3, 1), endpoint(0x1af4, 0x1041, 0x02_0000, false));
        space.headers.insert(bdf(0, 4, 0), bridge(1));
        space
            .headers
            .insert(bdf(1, 0, 0), endpoint(0x1af4, 0x1042, 0x01_0000, false));
        space.headers.insert(bdf(0, 5, 0), bridge(0));
        // Only reachable through a numbered bridge: never scanned.
        space
            .headers
            .insert(bdf(7, 0, 0), endpoint(0x1af4, 0x1042, 0x01_0000, false));

        let found = scan(0, 0xff, |b, o| space.read(b, o));
        let names: Vec<_> = found.iter().map(|f| format!("{}", f.bdf)).collect();
        assert_eq!(
            names,
            ["00:00.0", "00:02.0", "00:03.0", "00:03.1", "00:04.0", "00:05.0", "01:00.0"]
        );
        let edu = &found[1];
        assert_eq!(
            (edu.vendor, edu.device, edu.class),
            (0x1234, 0x11e8, 0xff_0000)
        );
        assert_eq!(edu.kind, HeaderKind::Endpoint);
        assert_eq!(
            edu.bars[0],
            Bar::Memory32 {
                address: 0x1000_0000,
                prefetchable: false
            }
        );
        assert!(found[2].multifunction);
        assert_eq!(found[4].kind, HeaderKind::Bridge);
        assert_eq!(found[4].secondary_bus, Some(1));
        assert_eq!(found[4].bars.len(), 2);
        // Bus 0: 32 probes of function 0, 8 of the multi-function device, 16 header reads per
        // function found; bus 1 likewise.
        assert!(
            space.reads < 2 * (32 + 8) + 16 * 7 + 8,
            "{} reads",
            space.reads
        );
    }

    #[test]
    fn scan_respects_the_bus_range_and_never_loops() {
        let mut space = FakeSpace {
            headers: BTreeMap::new(),
            reads: 0,
        };
        // A bridge that claims its own bus as secondary, and one beyond the range.
        space.headers.insert(bdf(2, 0, 0), bridge(2));
        space.headers.insert(bdf(2, 1, 0), bridge(9));
        let found = scan(2, 4, |b, o| space.read(b, o));
        assert_eq!(found.len(), 2);
        assert!(scan(0, 0, |_, _| 0xffff_ffff).is_empty());
    }

    #[test]
    fn absent_and_zero_vendor_functions_are_skipped() {
        assert_eq!(Function::parse(bdf(0, 0, 0), &[0xffff_ffff; 16]), None);
        assert_eq!(Function::parse(bdf(0, 0, 0), &[0; 16]), None);
    }

    #[test]
    fn stream_ids_through_iommu_map() {
        // QEMU virt: RIDs 0-0xffff map one to one.
        let qemu = [IommuMapEntry {
            rid_base: 0,
            iommu_phandle: 0x8007,
            sid_base: 0,
            length: 0x1_0000,
        }];
        assert_eq!(stream_id(&qemu, 0x10), Some(0x10));
        assert_eq!(stream_id(&qemu, 0xffff), Some(0xffff));
        // An offset map with a hole.
        let offset = [
            IommuMapEntry {
                rid_base: 0x100,
                iommu_phandle: 1,
                sid_base: 0x2000,
                length: 0x100,
            },
            IommuMapEntry {
                rid_base: 0x0,
                iommu_phandle: 1,
                sid_base: 0x10,
                length: 0x8,
            },
        ];
        assert_eq!(stream_id(&offset, 0x105), Some(0x2005));
        assert_eq!(stream_id(&offset, 0x7), Some(0x17));
        assert_eq!(stream_id(&offset, 0x8), None);
        assert_eq!(stream_id(&offset, 0x200), None);
        assert_eq!(stream_id(&[], 0), None);
    }
}
