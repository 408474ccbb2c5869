//! A checked, read-only index of a flattened device tree (FDT) blob.
//!
//! Why not the `fdt` crate here: its 0.1 API assumes a well-formed blob and panics (asserts,
//! unwraps, unchecked slicing, a fixed 64-entry parent stack) on malformed ones, and the
//! hypervisor must answer bad input with an error, never a panic. This module checks every
//! header field, offset, length, token and name once, while it builds an index of the nodes;
//! afterwards everything is plain slices into the blob. The tests still use the `fdt` crate, as
//! an independent parser of what `guest_dt` writes.

#![forbid(unsafe_code)]

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use crate::board::{DtError, Region};

/// First word of every FDT blob.
const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
/// Size of the version 17 header: ten big-endian words.
const HEADER_SIZE: usize = 40;
/// Deepest node nesting accepted; Linux's limit too.
const MAX_DEPTH: usize = 64;
/// Index of the root node in [`Tree::nodes`].
pub(crate) const ROOT: usize = 0;

/// One property: its name from the strings block and its raw value.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Property<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
}

/// One node, with its properties in blob order and its children as indices into the tree.
#[derive(Debug)]
pub(crate) struct Node<'a> {
    /// Name with unit address (`pl011@9000000`); empty for the root.
    pub name: &'a str,
    pub parent: Option<usize>,
    pub properties: Vec<Property<'a>>,
    pub children: Vec<usize>,
}

/// Every node of a blob, in document (depth-first) order; the root is at index [`ROOT`].
#[derive(Debug)]
pub(crate) struct Tree<'a> {
    pub nodes: Vec<Node<'a>>,
    pub boot_cpuid_phys: u32,
}

/// Reads the big-endian word at `offset`, if the slice holds it.
pub(crate) fn be32(data: &[u8], offset: usize) -> Option<u32> {
    let bytes = data.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// Reads a number of `cells` big-endian words (0, 1 or 2) at word index `first`.
pub(crate) fn read_cells(data: &[u8], first: usize, cells: u32) -> Option<u64> {
    if cells > 2 {
        return None;
    }
    let mut value: u64 = 0;
    for i in 0..cells as usize {
        let word = be32(data, first.checked_add(i)?.checked_mul(4)?)?;
        value = (value << 32) | u64::from(word);
    }
    Some(value)
}

/// The strings of a string-list property (`"a\0b\0"`); entries that are not UTF-8 are skipped.
pub(crate) fn string_list(value: &[u8]) -> impl Iterator<Item = &str> {
    let trimmed = value.strip_suffix(&[0]).unwrap_or(value);
    trimmed
        .split(|&byte| byte == 0)
        .filter(|_| !value.is_empty())
        .filter_map(|entry| core::str::from_utf8(entry).ok())
}

/// The value of a single-string property, without its terminating NUL.
pub(crate) fn string_value(value: &[u8]) -> Option<&str> {
    let text = value.strip_suffix(&[0])?;
    if text.contains(&0) {
        return None;
    }
    core::str::from_utf8(text).ok()
}

fn align4(offset: usize) -> Option<usize> {
    Some(offset.checked_add(3)? & !3)
}

/// The NUL-terminated UTF-8 string at the start of `data`, and its length without the NUL.
fn c_string(data: &[u8]) -> Option<&str> {
    let length = data.iter().position(|&byte| byte == 0)?;
    core::str::from_utf8(data.get(..length)?).ok()
}

impl<'a> Tree<'a> {
    /// Checks `dtb` and indexes its nodes.
    ///
    /// # Errors
    ///
    /// Any [`DtError`] of the reading kinds: a truncated or unknown header, a block outside
    /// the blob, or a malformed structure block.
    pub fn parse(dtb: &'a [u8]) -> Result<Self, DtError> {
        let header = |index: usize| be32(dtb, index * 4).ok_or(DtError::Truncated);
        let magic = header(0)?;
        if magic != FDT_MAGIC {
            return Err(DtError::BadMagic(magic));
        }
        let total_size = header(1)? as usize;
        let version = header(5)?;
        let last_compatible = header(6)?;
        if version < 17 || last_compatible > 17 {
            return Err(DtError::UnsupportedVersion {
                version,
                last_compatible,
            });
        }
        if total_size < HEADER_SIZE {
            return Err(DtError::Truncated);
        }
        let blob = dtb.get(..total_size).ok_or(DtError::Truncated)?;
        let block = |offset: u32, size: u32, name: &'static str| {
            let start = offset as usize;
            let end = start
                .checked_add(size as usize)
                .ok_or(DtError::BlockOutOfBounds(name))?;
            blob.get(start..end).ok_or(DtError::BlockOutOfBounds(name))
        };
        let structure_offset = header(2)?;
        let structure = block(structure_offset, header(9)?, "structure")?;
        let strings = block(header(3)?, header(8)?, "strings")?;
        // The reservation block is not used, but a blob whose header points outside itself is
        // broken, and a later reader of the same blob (the guest) would trip on it.
        block(header(4)?, 16, "memory reservation")?;

        let nodes = Self::parse_structure(structure, strings, structure_offset as usize)?;
        Ok(Tree {
            nodes,
            boot_cpuid_phys: header(7)?,
        })
    }

    fn parse_structure(
        structure: &'a [u8],
        strings: &'a [u8],
        base: usize,
    ) -> Result<Vec<Node<'a>>, DtError> {
        let mut nodes: Vec<Node<'a>> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        let mut offset = 0usize;
        loop {
            let malformed = |reason| DtError::Malformed {
                offset: base.saturating_add(offset),
                reason,
            };
            let token = be32(structure, offset)
                .ok_or_else(|| malformed("structure block ends before FDT_END"))?;
            let after_token = offset + 4;
            match token {
                FDT_BEGIN_NODE => {
                    if open.is_empty() && !nodes.is_empty() {
                        return Err(malformed("a second root node"));
                    }
                    if open.len() >= MAX_DEPTH {
                        return Err(malformed("nodes nested deeper than 64 levels"));
                    }
                    let rest = structure.get(after_token..).unwrap_or_default();
                    let name = c_string(rest)
                        .ok_or_else(|| malformed("node name not NUL-terminated UTF-8"))?;
                    let parent = open.last().copied();
                    let index = nodes.len();
                    if let Some(parent_node) = parent.and_then(|p| nodes.get_mut(p)) {
                        parent_node.children.push(index);
                    }
                    nodes.push(Node {
                        name,
                        parent,
                        properties: Vec::new(),
                        children: Vec::new(),
                    });
                    open.push(index);
                    offset = after_token
                        .checked_add(name.len() + 1)
                        .and_then(align4)
                        .ok_or_else(|| malformed("node name runs past the block"))?;
                }
                FDT_END_NODE => {
                    open.pop()
                        .ok_or_else(|| malformed("FDT_END_NODE without an open node"))?;
                    offset = after_token;
                }
                FDT_PROP => {
                    let current = *open
                        .last()
                        .ok_or_else(|| malformed("property outside any node"))?;
                    let length = be32(structure, after_token)
                        .ok_or_else(|| malformed("property header truncated"))?;
                    let name_offset = be32(structure, after_token + 4)
                        .ok_or_else(|| malformed("property header truncated"))?;
                    let value_start = after_token + 8;
                    let value_end = value_start
                        .checked_add(length as usize)
                        .ok_or_else(|| malformed("property value runs past the block"))?;
                    let value = structure
                        .get(value_start..value_end)
                        .ok_or_else(|| malformed("property value runs past the block"))?;
                    let name = strings
                        .get(name_offset as usize..)
                        .and_then(c_string)
                        .ok_or_else(|| malformed("property name outside the strings block"))?;
                    let node = nodes
                        .get_mut(current)
                        .ok_or_else(|| malformed("property outside any node"))?;
                    if !node.children.is_empty() {
                        return Err(malformed("property after a child node"));
                    }
                    node.properties.push(Property { name, value });
                    offset = align4(value_end)
                        .ok_or_else(|| malformed("property value runs past the block"))?;
                }
                FDT_NOP => offset = after_token,
                FDT_END => {
                    if !open.is_empty() || nodes.is_empty() {
                        return Err(malformed("FDT_END before the root node is closed"));
                    }
                    return Ok(nodes);
                }
                _ => return Err(malformed("unknown structure token")),
            }
        }
    }

    /// The node at `index`.
    pub fn node(&self, index: usize) -> Option<&Node<'a>> {
        self.nodes.get(index)
    }

    /// The value of the first property called `name` on node `index`.
    pub fn property(&self, index: usize, name: &str) -> Option<&'a [u8]> {
        self.node(index)?
            .properties
            .iter()
            .find(|property| property.name == name)
            .map(|property| property.value)
    }

    /// A one-cell property as a number.
    pub fn u32_property(&self, index: usize, name: &str) -> Option<u32> {
        let value = self.property(index, name)?;
        if value.len() != 4 {
            return None;
        }
        be32(value, 0)
    }

    /// Whether node `index` lists `compatible` among its `compatible` strings.
    pub fn is_compatible(&self, index: usize, compatible: &str) -> bool {
        self.property(index, "compatible")
            .is_some_and(|value| string_list(value).any(|entry| entry == compatible))
    }

    /// The node's `device_type`, if it is a proper string.
    pub fn device_type(&self, index: usize) -> Option<&'a str> {
        string_value(self.property(index, "device_type")?)
    }

    /// Whether the node is enabled: no `status`, or `status` "okay" / "ok".
    pub fn is_enabled(&self, index: usize) -> bool {
        match self.property(index, "status") {
            None => true,
            Some(value) => matches!(string_value(value), Some("okay" | "ok")),
        }
    }

    /// `#address-cells` and `#size-cells` that node `index` gives its children (defaults 2, 1).
    pub fn child_cells(&self, index: usize) -> (u32, u32) {
        (
            self.u32_property(index, "#address-cells").unwrap_or(2),
            self.u32_property(index, "#size-cells").unwrap_or(1),
        )
    }

    /// The full path of node `index`, e.g. `/intc@8000000/its@8080000`.
    pub fn path(&self, index: usize) -> String {
        let mut names = Vec::new();
        let mut current = Some(index);
        while let Some(node) = current.and_then(|i| self.node(i)) {
            if node.parent.is_some() {
                names.push(node.name);
            }
            current = node.parent;
        }
        if names.is_empty() {
            return String::from("/");
        }
        let mut path = String::new();
        for name in names.iter().rev() {
            path.push('/');
            path.push_str(name);
        }
        path
    }

    /// The node at an absolute `path`; a component without `@` also matches a node name with a
    /// unit address (`/memory` finds `memory@40000000`), as the device-tree specification allows.
    pub fn find_path(&self, path: &str) -> Option<usize> {
        let mut current = ROOT;
        let relative = path.strip_prefix('/')?;
        for component in relative.split('/').filter(|c| !c.is_empty()) {
            let node = self.node(current)?;
            current = *node.children.iter().find(|&&child| {
                self.node(child).is_some_and(|candidate| {
                    candidate.name == component
                        || (!component.contains('@')
                            && candidate.name.split('@').next() == Some(component))
                })
            })?;
        }
        Some(current)
    }

    /// Resolves a `stdout-path`-style reference: an absolute path or an alias, optionally
    /// followed by `:options`.
    pub fn resolve_reference(&self, reference: &str) -> Option<usize> {
        let target = reference.split(':').next()?;
        if target.starts_with('/') {
            return self.find_path(target);
        }
        let aliases = self.find_path("/aliases")?;
        let path = string_value(self.property(aliases, target)?)?;
        self.find_path(path)
    }

    /// Every node with a `phandle` (or legacy `linux,phandle`), by phandle value.
    pub fn phandles(&self) -> BTreeMap<u32, usize> {
        let mut map = BTreeMap::new();
        for index in 0..self.nodes.len() {
            let handle = self
                .u32_property(index, "phandle")
                .or_else(|| self.u32_property(index, "linux,phandle"));
            if let Some(handle) = handle {
                map.entry(handle).or_insert(index);
            }
        }
        map
    }

    /// The `reg` entries of node `index` as (address, size) pairs in its parent's address
    /// space, or `None` when the node has no `reg`.
    ///
    /// # Errors
    ///
    /// [`DtError::BadProperty`] when the parent's cell counts exceed 2, the length is not a
    /// whole number of entries, or an entry wraps past 2^64.
    pub fn reg(&self, index: usize) -> Result<Option<Vec<Region>>, DtError> {
        let Some(value) = self.property(index, "reg") else {
            return Ok(None);
        };
        let parent = self
            .node(index)
            .and_then(|node| node.parent)
            .unwrap_or(ROOT);
        let (address_cells, size_cells) = self.child_cells(parent);
        let bad = |reason| DtError::BadProperty {
            node: self.path(index),
            property: "reg",
            reason,
        };
        let entries = decode_pairs(value, address_cells, size_cells).ok_or_else(|| {
            bad("not a whole number of (address, size) entries of at most 2 cells each")
        })?;
        if entries.iter().any(|region| region.end().is_none()) {
            return Err(bad("an entry wraps past the end of the address space"));
        }
        Ok(Some(entries))
    }

    /// Translates `region`, an address range in the bus of node `index`'s parent, to a CPU
    /// physical range through the `ranges` of every ancestor bus. `None` when some ancestor
    /// has no `ranges` (its children are not memory-mapped) or no entry covers the range.
    pub fn translate(&self, index: usize, region: Region) -> Option<Region> {
        let mut bus = self.node(index)?.parent?;
        let mut current = region;
        while let Some(grandparent) = self.node(bus)?.parent {
            let ranges = self.property(bus, "ranges")?;
            if !ranges.is_empty() {
                let (child_cells, size_cells) = self.child_cells(bus);
                let (parent_cells, _) = self.child_cells(grandparent);
                let entry_cells = child_cells
                    .checked_add(parent_cells)?
                    .checked_add(size_cells)? as usize;
                if entry_cells == 0 || !ranges.len().is_multiple_of(entry_cells * 4) {
                    return None;
                }
                current = (0..ranges.len() / (entry_cells * 4)).find_map(|entry| {
                    let first = entry * entry_cells;
                    let child = read_cells(ranges, first, child_cells)?;
                    let parent = read_cells(ranges, first + child_cells as usize, parent_cells)?;
                    let size = read_cells(
                        ranges,
                        first + (child_cells + parent_cells) as usize,
                        size_cells,
                    )?;
                    let window = Region::new(child, size);
                    if !window.contains_region(&current) {
                        return None;
                    }
                    let base = parent.checked_add(current.base - child)?;
                    let translated = Region::new(base, current.size);
                    translated.end().map(|_| translated)
                })?;
            }
            bus = grandparent;
        }
        Some(current)
    }
}

/// Decodes a list of (address, size) pairs of the given cell counts (each at most 2).
pub(crate) fn decode_pairs(
    value: &[u8],
    address_cells: u32,
    size_cells: u32,
) -> Option<Vec<Region>> {
    if address_cells > 2 || size_cells > 2 {
        return None;
    }
    let entry_cells = (address_cells + size_cells) as usize;
    if entry_cells == 0 {
        return if value.is_empty() {
            Some(Vec::new())
        } else {
            None
        };
    }
    if !value.len().is_multiple_of(entry_cells * 4) {
        return None;
    }
    (0..value.len() / (entry_cells * 4))
        .map(|entry| {
            let first = entry * entry_cells;
            let base = read_cells(value, first, address_cells)?;
            let size = read_cells(value, first + address_cells as usize, size_cells)?;
            Some(Region::new(base, size))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/qemu-virt-smp4-1g.dtb");

    #[test]
    fn indexes_the_fixture() {
        let tree = Tree::parse(FIXTURE).unwrap();
        let its = tree.find_path("/intc@8000000/its").unwrap();
        assert_eq!(tree.path(its), "/intc@8000000/its@8080000");
        assert_eq!(
            tree.find_path("/memory"),
            tree.find_path("/memory@40000000")
        );
        assert_eq!(
            tree.resolve_reference("serial1"),
            tree.find_path("/pl011@9040000")
        );
        assert_eq!(tree.path(ROOT), "/");
        assert!(tree.phandles().contains_key(&0x8005));
    }

    #[test]
    fn translates_through_bus_ranges() {
        let tree = Tree::parse(FIXTURE).unwrap();
        // platform-bus@c000000 maps its bus address 0 to 0xc000000 for 0x2000000 bytes; a node
        // below it (none in the fixture) would go through that entry. Check the arithmetic on
        // the bus itself by pretending a child of it sits at bus address 0x1000.
        let bus = tree.find_path("/platform-bus@c000000").unwrap();
        let fake_child_of_bus = tree.nodes.len();
        let mut tree = tree;
        tree.nodes.push(Node {
            name: "child@1000",
            parent: Some(bus),
            properties: Vec::new(),
            children: Vec::new(),
        });
        assert_eq!(
            tree.translate(fake_child_of_bus, Region::new(0x1000, 0x100)),
            Some(Region::new(0xc00_1000, 0x100))
        );
        assert_eq!(
            tree.translate(fake_child_of_bus, Region::new(0x1ff_ff00, 0x200)),
            None
        );
    }

    #[test]
    fn rejects_damaged_headers() {
        assert_eq!(Tree::parse(&[]).unwrap_err(), DtError::Truncated);
        let mut bad = FIXTURE.to_vec();
        bad[0] = 0;
        assert!(matches!(Tree::parse(&bad), Err(DtError::BadMagic(_))));
        let mut bad = FIXTURE.to_vec();
        bad[8..12].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert_eq!(
            Tree::parse(&bad).unwrap_err(),
            DtError::BlockOutOfBounds("structure")
        );
        let mut bad = FIXTURE.to_vec();
        bad[20..24].copy_from_slice(&16u32.to_be_bytes());
        assert!(matches!(
            Tree::parse(&bad),
            Err(DtError::UnsupportedVersion { version: 16, .. })
        ));
    }

    #[test]
    fn cells_and_string_lists() {
        assert_eq!(
            read_cells(&[0, 0, 0, 1, 0, 0, 0, 2], 0, 2),
            Some(0x1_0000_0002)
        );
        assert_eq!(read_cells(&[0, 0, 0, 1], 0, 2), None);
        assert_eq!(read_cells(&[0; 12], 0, 3), None);
        assert_eq!(read_cells(&[], 0, 0), Some(0));
        let list: Vec<&str> = string_list(b"a,b\0c\0").collect();
        assert_eq!(list, ["a,b", "c"]);
        assert_eq!(string_list(b"").count(), 0);
        assert_eq!(string_value(b"smc\0"), Some("smc"));
        assert_eq!(string_value(b"smc"), None);
    }
}
