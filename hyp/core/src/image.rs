//! Guest image parsing: decides where each part of a guest image file goes in guest RAM and
//! where the guest starts, before any byte of it is copied.
//!
//! Three formats, tried in this order:
//! - **ELF**: ELF64, little-endian, `EM_AARCH64`, `ET_EXEC`; each `PT_LOAD` segment is placed at
//!   its physical address (`p_paddr`), the entry point is `e_entry`.
//! - **arm64 Linux `Image`**: magic "ARM\x64" at offset 56; placed at the 2 MiB-aligned RAM base
//!   plus `text_offset` (0x80000 for old images whose `image_size` is 0), as the kernel's
//!   booting.rst asks; it reserves `max(image_size, file length)` bytes (BSS included).
//! - **raw**: anything else, loaded at RAM base + 0x80000 (where QEMU's own `-kernel` loader puts
//!   kvm-unit-tests style binaries) and entered at its first byte.
//!
//! Only the first [`PREFIX_LEN`] bytes of the file are read here, so the caller can stream the
//! rest straight to its destination. Every sum is checked: a hostile header yields an
//! [`ImageError`], never a wrapped address or a panic.

#![forbid(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

/// How many bytes of the file [`plan`] wants to see (fewer when the file is shorter).
pub const PREFIX_LEN: usize = 64 * 1024;
/// Offset from the RAM base at which raw images are loaded.
pub const RAW_LOAD_OFFSET: u64 = 0x8_0000;

/// The Linux arm64 `Image` header magic, "ARM\x64" read as a little-endian word at offset 56.
const LINUX_MAGIC: u32 = 0x644d_5241;
const LINUX_MAGIC_OFFSET: usize = 56;
/// `text_offset` assumed for images whose `image_size` is 0 (kernels before 3.17).
const LINUX_DEFAULT_TEXT_OFFSET: u64 = 0x8_0000;
/// The kernel image must sit at a 2 MiB-aligned base plus `text_offset`.
const LINUX_BASE_ALIGN: u64 = 2 << 20;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELF_CLASS_64: u8 = 2;
const ELF_DATA_LITTLE_ENDIAN: u8 = 1;
const ELF_TYPE_EXEC: u16 = 2;
const ELF_MACHINE_AARCH64: u16 = 183;
const ELF_HEADER_SIZE: usize = 64;
const ELF_PROGRAM_HEADER_SIZE: usize = 56;
const ELF_PT_LOAD: u32 = 1;

/// The format [`plan`] recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// An arm64 Linux kernel `Image` (uncompressed, with the 64-byte header).
    LinuxImage,
    /// An AArch64 ELF64 executable.
    Elf,
    /// A flat binary with no header.
    Raw,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::LinuxImage => "Linux Image",
            Format::Elf => "ELF",
            Format::Raw => "raw image",
        })
    }
}

/// One contiguous piece of guest memory to fill: `file_size` bytes from `file_offset` of the
/// file, then zeros up to `mem_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address (IPA) of the first byte.
    pub ipa: u64,
    /// Offset of the first byte in the file.
    pub file_offset: u64,
    /// Bytes copied from the file.
    pub file_size: u64,
    /// Bytes of guest memory the segment occupies (`>= file_size`; the rest is zeroed).
    pub mem_size: u64,
}

/// Where an image goes and where it starts; every segment lies inside the RAM window given to
/// [`plan`], no two overlap, and every file range lies inside the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadPlan {
    /// The recognised format.
    pub format: Format,
    /// The pieces to load, in ascending IPA order.
    pub segments: Vec<Segment>,
    /// IPA of the first instruction.
    pub entry: u64,
    /// Highest IPA used by the image, exclusive.
    pub end: u64,
}

/// Why an image cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// The file is empty.
    Empty,
    /// The caller passed more bytes than the file holds.
    PrefixLongerThanFile {
        /// Bytes passed.
        prefix_len: usize,
        /// Length of the file.
        file_len: u64,
    },
    /// The RAM window is empty or wraps past 2^64.
    BadRamWindow {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// The file starts with the ELF magic but is shorter than an ELF64 header.
    ElfTruncatedHeader,
    /// `EI_CLASS` is not ELFCLASS64.
    ElfNot64Bit(u8),
    /// `EI_DATA` is not little-endian.
    ElfNotLittleEndian(u8),
    /// `e_machine` is not EM_AARCH64 (183).
    ElfWrongMachine(u16),
    /// `e_type` is not ET_EXEC (2); relocatable and position-independent files are not loaded.
    ElfNotExecutable(u16),
    /// `e_phentsize` is smaller than an ELF64 program header.
    ElfBadProgramHeaderSize(u16),
    /// The program header table does not lie inside the bytes read from the file.
    ElfProgramHeadersOutsidePrefix {
        /// `e_phoff`.
        offset: u64,
        /// Bytes read from the file.
        prefix_len: usize,
    },
    /// No `PT_LOAD` segment with a non-zero memory size.
    ElfNoLoadableSegment,
    /// A segment's `p_filesz` exceeds its `p_memsz`.
    ElfFileSizeExceedsMemSize {
        /// Program header index.
        index: usize,
        /// `p_filesz`.
        file_size: u64,
        /// `p_memsz`.
        mem_size: u64,
    },
    /// A segment's file range runs past the end of the file (or wraps).
    ElfSegmentOutsideFile {
        /// Program header index.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        size: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A segment does not lie inside guest RAM (its end may not even fit in 64 bits).
    ElfSegmentOutsideRam {
        /// Program header index.
        index: usize,
        /// `p_paddr`.
        start: u64,
        /// `p_memsz`.
        size: u64,
        /// The RAM window.
        ram: (u64, u64),
    },
    /// Two segments share guest memory.
    ElfSegmentsOverlap {
        /// Program header index of the lower segment.
        first: usize,
        /// Program header index of the higher segment.
        second: usize,
    },
    /// `e_entry` lies outside guest RAM.
    ElfEntryOutsideRam {
        /// `e_entry`.
        entry: u64,
        /// The RAM window.
        ram: (u64, u64),
    },
    /// The Linux image (or raw image) does not fit in guest RAM at its load address.
    OutsideRam {
        /// Which format was being placed.
        format: Format,
        /// Load address (IPA), if it could be computed without wrapping.
        start: Option<u64>,
        /// Bytes the image needs.
        size: u64,
        /// The RAM window.
        ram: (u64, u64),
    },
}

/// Writes `[start, start + size)`, or `[start, +size)` when the end does not fit in 64 bits.
fn write_range(f: &mut fmt::Formatter<'_>, start: u64, size: u64) -> fmt::Result {
    match start.checked_add(size) {
        Some(end) => write!(f, "[{start:#x}, {end:#x})"),
        None => write!(f, "[{start:#x}, +{size:#x})"),
    }
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ram = |f: &mut fmt::Formatter<'_>, (start, end): (u64, u64)| {
            write!(f, " lies outside guest RAM [{start:#x}, {end:#x})")
        };
        match *self {
            ImageError::Empty => write!(f, "image: the file is empty"),
            ImageError::PrefixLongerThanFile {
                prefix_len,
                file_len,
            } => write!(
                f,
                "image: {prefix_len} bytes read from a file of only {file_len} bytes"
            ),
            ImageError::BadRamWindow { base, size } => write!(
                f,
                "image: guest RAM window (base {base:#x}, size {size:#x}) is empty or wraps"
            ),
            ImageError::ElfTruncatedHeader => {
                write!(f, "ELF: file shorter than the 64-byte ELF64 header")
            }
            ImageError::ElfNot64Bit(class) => {
                write!(f, "ELF: class {class} is not ELFCLASS64 (2)")
            }
            ImageError::ElfNotLittleEndian(data) => {
                write!(f, "ELF: data encoding {data} is not little-endian (1)")
            }
            ImageError::ElfWrongMachine(machine) => {
                write!(f, "ELF: machine {machine} is not EM_AARCH64 (183)")
            }
            ImageError::ElfNotExecutable(kind) => {
                write!(f, "ELF: type {kind} is not ET_EXEC (2)")
            }
            ImageError::ElfBadProgramHeaderSize(size) => write!(
                f,
                "ELF: program header entry size {size} is below the ELF64 size 56"
            ),
            ImageError::ElfProgramHeadersOutsidePrefix { offset, prefix_len } => write!(
                f,
                "ELF: program headers at offset {offset:#x} do not lie in the first {prefix_len} bytes of the file"
            ),
            ImageError::ElfNoLoadableSegment => write!(f, "ELF: no PT_LOAD segment"),
            ImageError::ElfFileSizeExceedsMemSize {
                index,
                file_size,
                mem_size,
            } => write!(
                f,
                "ELF: segment {index} file size {file_size:#x} exceeds its memory size {mem_size:#x}"
            ),
            ImageError::ElfSegmentOutsideFile {
                index,
                offset,
                size,
                file_len,
            } => {
                write!(f, "ELF: segment {index} file range ")?;
                write_range(f, offset, size)?;
                write!(f, " runs past the end of the file ({file_len:#x} bytes)")
            }
            ImageError::ElfSegmentOutsideRam {
                index,
                start,
                size,
                ram: window,
            } => {
                write!(f, "ELF: segment {index} ")?;
                write_range(f, start, size)?;
                ram(f, window)
            }
            ImageError::ElfSegmentsOverlap { first, second } => {
                write!(f, "ELF: segments {first} and {second} overlap")
            }
            ImageError::ElfEntryOutsideRam { entry, ram: window } => {
                write!(f, "ELF: entry point {entry:#x}")?;
                ram(f, window)
            }
            ImageError::OutsideRam {
                format,
                start,
                size,
                ram: window,
            } => {
                write!(f, "{format}: ")?;
                match start {
                    Some(start) => write_range(f, start, size)?,
                    None => write!(f, "load address wraps, size {size:#x},")?,
                }
                ram(f, window)
            }
        }
    }
}

fn le16(bytes: &[u8], offset: usize) -> Option<u16> {
    let field = bytes.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes(field.try_into().ok()?))
}

fn le32(bytes: &[u8], offset: usize) -> Option<u32> {
    let field = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

fn le64(bytes: &[u8], offset: usize) -> Option<u64> {
    let field = bytes.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_le_bytes(field.try_into().ok()?))
}

/// The RAM window as `[start, end)`.
#[derive(Clone, Copy)]
struct Ram {
    start: u64,
    end: u64,
}

impl Ram {
    /// Whether `[start, start + size)` lies inside the window (and does not wrap).
    fn holds(&self, start: u64, size: u64) -> bool {
        start >= self.start && start.checked_add(size).is_some_and(|end| end <= self.end)
    }

    fn pair(&self) -> (u64, u64) {
        (self.start, self.end)
    }
}

/// Works out where an image goes in guest RAM and where it starts.
///
/// `prefix` is the first `min(file_len, PREFIX_LEN)` bytes of the file; the RAM window is
/// `[ram_base, ram_base + ram_size)` in IPA space.
///
/// # Errors
///
/// An [`ImageError`] naming the first problem found: an empty file or RAM window, an ELF file
/// this hypervisor does not run, or any part of the image outside the file or outside RAM.
pub fn plan(
    prefix: &[u8],
    file_len: u64,
    ram_base: u64,
    ram_size: u64,
) -> Result<LoadPlan, ImageError> {
    if file_len == 0 {
        return Err(ImageError::Empty);
    }
    if prefix.len() as u64 > file_len {
        return Err(ImageError::PrefixLongerThanFile {
            prefix_len: prefix.len(),
            file_len,
        });
    }
    let ram = match ram_base.checked_add(ram_size) {
        Some(end) if ram_size > 0 => Ram {
            start: ram_base,
            end,
        },
        _ => {
            return Err(ImageError::BadRamWindow {
                base: ram_base,
                size: ram_size,
            })
        }
    };

    if prefix.starts_with(&ELF_MAGIC) {
        plan_elf(prefix, file_len, ram)
    } else if le32(prefix, LINUX_MAGIC_OFFSET) == Some(LINUX_MAGIC) {
        plan_linux(prefix, file_len, ram)
    } else {
        let start = ram.start.checked_add(RAW_LOAD_OFFSET);
        plan_flat(Format::Raw, start, file_len, file_len, ram)
    }
}

/// A single segment holding the whole file at `start`, reserving `mem_size` bytes.
fn plan_flat(
    format: Format,
    start: Option<u64>,
    file_len: u64,
    mem_size: u64,
    ram: Ram,
) -> Result<LoadPlan, ImageError> {
    let outside = ImageError::OutsideRam {
        format,
        start,
        size: mem_size,
        ram: ram.pair(),
    };
    let Some(start) = start.filter(|&start| ram.holds(start, mem_size)) else {
        return Err(outside);
    };
    let end = start.checked_add(mem_size).ok_or(outside)?;
    Ok(LoadPlan {
        format,
        segments: alloc::vec![Segment {
            ipa: start,
            file_offset: 0,
            file_size: file_len,
            mem_size,
        }],
        entry: start,
        end,
    })
}

fn plan_linux(prefix: &[u8], file_len: u64, ram: Ram) -> Result<LoadPlan, ImageError> {
    // The magic at 56 was read, so the 64-byte header is in the prefix.
    let text_offset = le64(prefix, 8).unwrap_or(0);
    let image_size = le64(prefix, 16).unwrap_or(0);
    let text_offset = if image_size == 0 {
        LINUX_DEFAULT_TEXT_OFFSET
    } else {
        text_offset
    };
    let aligned_base = ram
        .start
        .checked_add(LINUX_BASE_ALIGN - 1)
        .map(|value| value & !(LINUX_BASE_ALIGN - 1));
    let start = aligned_base.and_then(|base| base.checked_add(text_offset));
    plan_flat(
        Format::LinuxImage,
        start,
        file_len,
        image_size.max(file_len),
        ram,
    )
}

fn plan_elf(prefix: &[u8], file_len: u64, ram: Ram) -> Result<LoadPlan, ImageError> {
    if prefix.len() < ELF_HEADER_SIZE {
        return Err(ImageError::ElfTruncatedHeader);
    }
    let field16 = |offset| le16(prefix, offset).ok_or(ImageError::ElfTruncatedHeader);
    let field64 = |offset| le64(prefix, offset).ok_or(ImageError::ElfTruncatedHeader);
    let class = prefix.get(4).copied().unwrap_or(0);
    let data = prefix.get(5).copied().unwrap_or(0);
    if class != ELF_CLASS_64 {
        return Err(ImageError::ElfNot64Bit(class));
    }
    if data != ELF_DATA_LITTLE_ENDIAN {
        return Err(ImageError::ElfNotLittleEndian(data));
    }
    let kind = field16(16)?;
    let machine = field16(18)?;
    if machine != ELF_MACHINE_AARCH64 {
        return Err(ImageError::ElfWrongMachine(machine));
    }
    if kind != ELF_TYPE_EXEC {
        return Err(ImageError::ElfNotExecutable(kind));
    }
    let entry = field64(24)?;
    let table_offset = field64(32)?;
    let entry_size = field16(54)?;
    let entry_count = field16(56)?;
    if usize::from(entry_size) < ELF_PROGRAM_HEADER_SIZE {
        return Err(ImageError::ElfBadProgramHeaderSize(entry_size));
    }

    let table_len = usize::from(entry_size) * usize::from(entry_count);
    let table = usize::try_from(table_offset)
        .ok()
        .and_then(|start| prefix.get(start..start.checked_add(table_len)?))
        .ok_or(ImageError::ElfProgramHeadersOutsidePrefix {
            offset: table_offset,
            prefix_len: prefix.len(),
        })?;

    let mut segments: Vec<(usize, Segment)> = Vec::new();
    for (index, header) in table.chunks_exact(usize::from(entry_size)).enumerate() {
        // Each chunk holds at least 56 bytes, so every field read below succeeds.
        let field = |offset| le64(header, offset).unwrap_or(0);
        if le32(header, 0) != Some(ELF_PT_LOAD) {
            continue;
        }
        let (file_offset, ipa, file_size, mem_size) = (field(8), field(24), field(32), field(40));
        if file_size > mem_size {
            return Err(ImageError::ElfFileSizeExceedsMemSize {
                index,
                file_size,
                mem_size,
            });
        }
        if file_offset
            .checked_add(file_size)
            .is_none_or(|end| end > file_len)
        {
            return Err(ImageError::ElfSegmentOutsideFile {
                index,
                offset: file_offset,
                size: file_size,
                file_len,
            });
        }
        if mem_size == 0 {
            continue;
        }
        if !ram.holds(ipa, mem_size) {
            return Err(ImageError::ElfSegmentOutsideRam {
                index,
                start: ipa,
                size: mem_size,
                ram: ram.pair(),
            });
        }
        segments.push((
            index,
            Segment {
                ipa,
                file_offset,
                file_size,
                mem_size,
            },
        ));
    }

    segments.sort_by_key(|(_, segment)| segment.ipa);
    for pair in segments.windows(2) {
        let [(first, lower), (second, higher)] = pair else {
            continue;
        };
        // Both lie inside RAM, so the sum cannot wrap.
        if lower.ipa.saturating_add(lower.mem_size) > higher.ipa {
            return Err(ImageError::ElfSegmentsOverlap {
                first: *first,
                second: *second,
            });
        }
    }
    let end = segments
        .iter()
        .map(|(_, segment)| segment.ipa.saturating_add(segment.mem_size))
        .max()
        .ok_or(ImageError::ElfNoLoadableSegment)?;
    if !ram.holds(entry, 1) {
        return Err(ImageError::ElfEntryOutsideRam {
            entry,
            ram: ram.pair(),
        });
    }
    Ok(LoadPlan {
        format: Format::Elf,
        segments: segments.into_iter().map(|(_, segment)| segment).collect(),
        entry,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::{String, ToString};
    use alloc::vec;
    use proptest::prelude::*;

    const RAM_BASE: u64 = 0x4000_0000;
    const RAM_SIZE: u64 = 0x1000_0000; // 256 MiB
    const RAM: (u64, u64) = (RAM_BASE, RAM_BASE + RAM_SIZE);

    fn linux_header(text_offset: u64, image_size: u64) -> Vec<u8> {
        let mut header = vec![0u8; 64];
        header[0..4].copy_from_slice(&[0x4d, 0x5a, 0, 0x91]); // "MZ" + add x13, x18, #0x16
        header[8..16].copy_from_slice(&text_offset.to_le_bytes());
        header[16..24].copy_from_slice(&image_size.to_le_bytes());
        header[24..32].copy_from_slice(&0xau64.to_le_bytes());
        header[56..60].copy_from_slice(&LINUX_MAGIC.to_le_bytes());
        header
    }

    /// A program header: (type, offset, paddr, filesz, memsz).
    type Phdr = (u32, u64, u64, u64, u64);

    fn elf(entry: u64, phdrs: &[Phdr]) -> Vec<u8> {
        let mut file = vec![0u8; 64];
        file[0..4].copy_from_slice(&ELF_MAGIC);
        file[4] = ELF_CLASS_64;
        file[5] = ELF_DATA_LITTLE_ENDIAN;
        file[6] = 1;
        file[16..18].copy_from_slice(&ELF_TYPE_EXEC.to_le_bytes());
        file[18..20].copy_from_slice(&ELF_MACHINE_AARCH64.to_le_bytes());
        file[20..24].copy_from_slice(&1u32.to_le_bytes());
        file[24..32].copy_from_slice(&entry.to_le_bytes());
        file[32..40].copy_from_slice(&64u64.to_le_bytes());
        file[52..54].copy_from_slice(&64u16.to_le_bytes());
        file[54..56].copy_from_slice(&56u16.to_le_bytes());
        file[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(kind, offset, paddr, file_size, mem_size) in phdrs {
            let mut header = [0u8; 56];
            header[0..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&offset.to_le_bytes());
            header[16..24].copy_from_slice(&paddr.to_le_bytes()); // vaddr = paddr
            header[24..32].copy_from_slice(&paddr.to_le_bytes());
            header[32..40].copy_from_slice(&file_size.to_le_bytes());
            header[40..48].copy_from_slice(&mem_size.to_le_bytes());
            file.extend_from_slice(&header);
        }
        file
    }

    fn plan_file(file: &[u8], file_len: u64) -> Result<LoadPlan, ImageError> {
        let prefix = &file[..file.len().min(PREFIX_LEN)];
        plan(prefix, file_len, RAM_BASE, RAM_SIZE)
    }

    #[test]
    fn linux_image_at_text_offset() {
        let header = linux_header(0, 0x200_0000);
        let placed = plan_file(&header, 0x150_0000).unwrap();
        assert_eq!(
            placed,
            LoadPlan {
                format: Format::LinuxImage,
                segments: vec![Segment {
                    ipa: 0x4000_0000,
                    file_offset: 0,
                    file_size: 0x150_0000,
                    mem_size: 0x200_0000,
                }],
                entry: 0x4000_0000,
                end: 0x4200_0000,
            }
        );
    }

    #[test]
    fn linux_image_rules() {
        // image_size 0: text_offset is 0x80000 whatever the header says; size is the file's.
        let placed = plan_file(&linux_header(0x1234, 0), 0x10_0000).unwrap();
        assert_eq!((placed.entry, placed.end), (0x4008_0000, 0x4018_0000));
        // A file longer than image_size reserves the file length.
        let placed = plan_file(&linux_header(0x8_0000, 0x1000), 0x2000).unwrap();
        assert_eq!(placed.segments[0].mem_size, 0x2000);
        // The base is rounded up to 2 MiB.
        let prefix = linux_header(0x8_0000, 0x1000);
        let placed = plan(&prefix, 0x1000, RAM_BASE + 0x1000, RAM_SIZE).unwrap();
        assert_eq!(placed.entry, 0x4028_0000);
    }

    #[test]
    fn raw_image_at_base_plus_512k() {
        let placed = plan_file(&[0x14, 0, 0, 0], 0x4000).unwrap();
        assert_eq!(
            placed,
            LoadPlan {
                format: Format::Raw,
                segments: vec![Segment {
                    ipa: 0x4008_0000,
                    file_offset: 0,
                    file_size: 0x4000,
                    mem_size: 0x4000,
                }],
                entry: 0x4008_0000,
                end: 0x4008_4000,
            }
        );
        // Too short to hold the Linux magic: raw.
        assert_eq!(plan_file(&[0; 57], 57).unwrap().format, Format::Raw);
    }

    #[test]
    fn elf_segments_sorted_with_bss() {
        let file = elf(
            0x4008_0000,
            &[
                (ELF_PT_LOAD, 0x2000, 0x4010_0000, 0x100, 0x3000),
                (6, 0, 0, 0, 0), // PT_PHDR: ignored
                (ELF_PT_LOAD, 0x1000, 0x4008_0000, 0x1000, 0x1000),
                (ELF_PT_LOAD, 0x1000, 0x4020_0000, 0, 0), // empty: ignored
            ],
        );
        let placed = plan_file(&file, 0x3000).unwrap();
        assert_eq!(placed.format, Format::Elf);
        assert_eq!(placed.entry, 0x4008_0000);
        assert_eq!(placed.end, 0x4010_3000);
        assert_eq!(
            placed.segments,
            [
                Segment {
                    ipa: 0x4008_0000,
                    file_offset: 0x1000,
                    file_size: 0x1000,
                    mem_size: 0x1000
                },
                Segment {
                    ipa: 0x4010_0000,
                    file_offset: 0x2000,
                    file_size: 0x100,
                    mem_size: 0x3000
                },
            ]
        );
    }

    #[test]
    fn elf_header_errors() {
        let good = elf(RAM_BASE, &[(ELF_PT_LOAD, 0, RAM_BASE, 0x10, 0x10)]);
        let with = |offset: usize, bytes: &[u8]| {
            let mut file = good.clone();
            file[offset..offset + bytes.len()].copy_from_slice(bytes);
            plan_file(&file, file.len() as u64).unwrap_err()
        };
        let cases = [
            (with(4, &[1]), "ELF: class 1 is not ELFCLASS64 (2)"),
            (with(5, &[2]), "ELF: data encoding 2 is not little-endian (1)"),
            (with(18, &[62, 0]), "ELF: machine 62 is not EM_AARCH64 (183)"),
            (with(16, &[3, 0]), "ELF: type 3 is not ET_EXEC (2)"),
            (
                with(54, &[32, 0]),
                "ELF: program header entry size 32 is below the ELF64 size 56",
            ),
            (
                with(32, &[0, 0, 1]),
                "ELF: program headers at offset 0x10000 do not lie in the first 120 bytes of the file",
            ),
            (with(56, &[0, 0]), "ELF: no PT_LOAD segment"),
            (
                plan_file(&good[..40], 40).unwrap_err(),
                "ELF: file shorter than the 64-byte ELF64 header",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn elf_segment_errors() {
        let load =
            |offset, paddr, file_size, mem_size| (ELF_PT_LOAD, offset, paddr, file_size, mem_size);
        let cases: [(u64, Vec<Phdr>, u64, &str); 7] = [
            (
                RAM_BASE,
                vec![load(0, RAM_BASE, 0x20, 0x10)],
                0x1000,
                "ELF: segment 0 file size 0x20 exceeds its memory size 0x10",
            ),
            (
                RAM_BASE,
                vec![load(0, RAM_BASE, 0x10, 0x10), load(0xff8, RAM_BASE + 0x100, 0x10, 0x10)],
                0x1000,
                "ELF: segment 1 file range [0xff8, 0x1008) runs past the end of the file (0x1000 bytes)",
            ),
            (
                RAM_BASE,
                vec![load(u64::MAX, RAM_BASE, 2, 2)],
                0x1000,
                "ELF: segment 0 file range [0xffffffffffffffff, +0x2) runs past the end of the file (0x1000 bytes)",
            ),
            (
                RAM_BASE,
                vec![load(0, RAM_BASE, 0x10, 0x10), load(0, 0x3fff_f000, 0, 0x2000)],
                0x1000,
                "ELF: segment 1 [0x3ffff000, 0x40001000) lies outside guest RAM [0x40000000, 0x50000000)",
            ),
            (
                RAM_BASE,
                vec![load(0, u64::MAX - 1, 0, 4)],
                0x1000,
                "ELF: segment 0 [0xfffffffffffffffe, +0x4) lies outside guest RAM [0x40000000, 0x50000000)",
            ),
            (
                RAM_BASE,
                vec![load(0, RAM_BASE + 0x1000, 0x10, 0x1000), load(0, RAM_BASE + 0x1fff, 0, 1), load(0, RAM_BASE, 0, 0x1000)],
                0x1000,
                "ELF: segments 0 and 1 overlap",
            ),
            (
                0x8_0000,
                vec![load(0, RAM_BASE, 0x10, 0x10)],
                0x1000,
                "ELF: entry point 0x80000 lies outside guest RAM [0x40000000, 0x50000000)",
            ),
        ];
        for (entry, phdrs, file_len, message) in cases {
            let file = elf(entry, &phdrs);
            assert_eq!(plan_file(&file, file_len).unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn flat_and_argument_errors() {
        let cases: [(ImageError, String); 7] = [
            (
                plan_file(&linux_header(0x10, 0x1000_0000), 0x1000).unwrap_err(),
                "Linux Image: [0x40000010, 0x50000010) lies outside guest RAM [0x40000000, 0x50000000)".into(),
            ),
            (
                plan_file(&linux_header(u64::MAX, 0x1000), 0x1000).unwrap_err(),
                "Linux Image: load address wraps, size 0x1000, lies outside guest RAM [0x40000000, 0x50000000)".into(),
            ),
            (
                plan_file(&[1, 2, 3], RAM_SIZE).unwrap_err(),
                "raw image: [0x40080000, 0x50080000) lies outside guest RAM [0x40000000, 0x50000000)".into(),
            ),
            (plan_file(&[], 0).unwrap_err(), "image: the file is empty".into()),
            (
                plan(&[1, 2, 3], 2, RAM_BASE, RAM_SIZE).unwrap_err(),
                "image: 3 bytes read from a file of only 2 bytes".into(),
            ),
            (
                plan(&[1], 1, u64::MAX, 2).unwrap_err(),
                "image: guest RAM window (base 0xffffffffffffffff, size 0x2) is empty or wraps".into(),
            ),
            (
                plan(&[1], 1, RAM_BASE, 0).unwrap_err(),
                "image: guest RAM window (base 0x40000000, size 0x0) is empty or wraps".into(),
            ),
        ];
        // An image exactly as large as RAM fits.
        let exact = plan_file(&linux_header(0, RAM_SIZE), 0x1000).unwrap();
        assert_eq!(exact.end, RAM.1);
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }

    /// An arbitrary file, biased towards each format's header so the checks get exercised.
    fn any_file() -> impl Strategy<Value = Vec<u8>> {
        let raw = proptest::collection::vec(any::<u8>(), 0..256);
        let linux = (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(text_offset, image_size, tail)| {
                let mut file = linux_header(text_offset % 0x1000_0000, image_size % 0x2000_0000);
                file.extend(tail);
                file
            });
        let phdr = (
            0u32..3,
            0u64..0x400,
            0x3ff0_0000u64..0x5010_0000,
            0u64..0x300,
            0u64..0x10_0000,
        );
        let elf_file = (
            0x3ff0_0000u64..0x5010_0000,
            proptest::collection::vec(phdr, 0..5),
            proptest::collection::vec((0usize..400, any::<u8>()), 0..3),
        )
            .prop_map(|(entry, phdrs, damage)| {
                let mut file = elf(entry, &phdrs);
                for (offset, byte) in damage {
                    let index = offset % file.len();
                    file[index] = byte;
                }
                file
            });
        prop_oneof![raw, linux, elf_file]
    }

    proptest! {
        #[test]
        fn accepted_plans_lie_inside_ram(
            file in any_file(),
            extra in 0u64..0x1000,
            ram_base in prop_oneof![Just(RAM_BASE), any::<u64>()],
            ram_size in prop_oneof![Just(RAM_SIZE), any::<u64>()],
        ) {
            let file_len = file.len() as u64 + extra;
            if let Ok(placed) = plan(&file, file_len, ram_base, ram_size) {
                let ram_end = ram_base.checked_add(ram_size).unwrap();
                prop_assert!(placed.entry >= ram_base && placed.entry < ram_end);
                prop_assert!(placed.end <= ram_end);
                let mut previous_end = ram_base;
                for segment in &placed.segments {
                    let end = segment.ipa.checked_add(segment.mem_size).unwrap();
                    prop_assert!(segment.ipa >= previous_end && end <= placed.end);
                    prop_assert!(segment.file_size <= segment.mem_size);
                    prop_assert!(segment.file_offset + segment.file_size <= file_len);
                    previous_end = end;
                }
            }
        }
    }
}
