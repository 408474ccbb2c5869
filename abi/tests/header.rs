//! Keeps the C header `abi/include/stagehand.h` in step with the Rust definitions: every
//! `#define` of the header must name a value this crate defines, with the same value, and every
//! value must appear; then, when a C compiler is at hand, the header must compile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use stagehand_abi::{
    access, attr, batch, cache_op, dev_flag, dma_direction, dma_sg, dma_sync, driver, feature,
    function, mair, page_flag, Status, ABI_MAJOR, ABI_MINOR, PAGE_SIZE,
};

const HEADER: &str = include_str!("../include/stagehand.h");
/// The include guard: the one define without a value.
const GUARD: &str = "STAGEHAND_H";

/// Every value the header must define, by its C name.
fn expected() -> BTreeMap<String, i128> {
    let mut values: Vec<(&str, i128)> = vec![
        ("ABI_MAJOR", ABI_MAJOR.into()),
        ("ABI_MINOR", ABI_MINOR.into()),
        ("FN_CALL_UID", function::CALL_UID.into()),
        ("FN_REVISION", function::REVISION.into()),
        ("FN_FEATURES", function::FEATURES.into()),
        ("FN_MEM_SET_ATTR", function::MEM_SET_ATTR.into()),
        ("FN_MEM_GET_ATTR", function::MEM_GET_ATTR.into()),
        ("FN_MEM_QUERY_VA", function::MEM_QUERY_VA.into()),
        ("FN_CACHE_OP", function::CACHE_OP.into()),
        ("FN_CACHE_OP_BATCH", function::CACHE_OP_BATCH.into()),
        ("FN_DEV_INFO", function::DEV_INFO.into()),
        ("FN_DMA_MAP", function::DMA_MAP.into()),
        ("FN_DMA_UNMAP", function::DMA_UNMAP.into()),
        ("FN_DMA_SYNC", function::DMA_SYNC.into()),
        ("FN_DMA_MAP_SG", function::DMA_MAP_SG.into()),
        ("FN_DMA_UNMAP_SG", function::DMA_UNMAP_SG.into()),
        ("DMA_BIDIRECTIONAL", dma_direction::BIDIRECTIONAL.into()),
        ("DMA_TO_DEVICE", dma_direction::TO_DEVICE.into()),
        ("DMA_FROM_DEVICE", dma_direction::FROM_DEVICE.into()),
        ("DMA_SYNC_FOR_CPU", dma_sync::FOR_CPU.into()),
        ("DMA_SYNC_FOR_DEVICE", dma_sync::FOR_DEVICE.into()),
        ("DEV_COHERENT", dev_flag::COHERENT.into()),
        ("DEV_STRICT", dev_flag::STRICT.into()),
        ("DMA_SG_SEGMENT_SIZE", dma_sg::SEGMENT_SIZE.into()),
        ("DMA_SG_ARRAY_ALIGN", dma_sg::ARRAY_ALIGN.into()),
        ("DMA_SG_HANDLE_OFFSET", dma_sg::HANDLE_OFFSET.into()),
        ("DMA_SG_SEGMENTS_PER_CALL", dma_sg::SEGMENTS_PER_CALL.into()),
        ("DMA_SG_MAX_SEGMENTS", dma_sg::MAX_SEGMENTS.into()),
        ("FN_AUDIT_READ", function::AUDIT_READ.into()),
        ("FN_AUDIT_MARK", function::AUDIT_MARK.into()),
        ("FEATURE_FWB", feature::FWB.into()),
        ("FEATURE_SMMU", feature::SMMU.into()),
        ("FEATURE_DMA_STRICT", feature::DMA_STRICT.into()),
        ("FEATURE_VA_ADDRESSING", feature::VA_ADDRESSING.into()),
        ("ATTR_NORMAL_WB", attr::NORMAL_WB.into()),
        ("ATTR_NORMAL_NC", attr::NORMAL_NC.into()),
        ("PAGE_PINNED", page_flag::PINNED.into()),
        ("PAGE_BLOCK_MAPPED", page_flag::BLOCK_MAPPED.into()),
        ("ACCESS_READ", access::READ.into()),
        ("ACCESS_WRITE", access::WRITE.into()),
        ("MAIR_NORMAL_WB", mair::NORMAL_WB.into()),
        ("MAIR_NORMAL_NC", mair::NORMAL_NC.into()),
        ("MAIR_DEVICE_NGNRNE", mair::DEVICE_NGNRNE.into()),
        ("CACHE_CLEAN", cache_op::CLEAN.into()),
        ("CACHE_INVALIDATE", cache_op::INVALIDATE.into()),
        ("CACHE_CLEAN_INVALIDATE", cache_op::CLEAN_INVALIDATE.into()),
        ("CACHE_FLAG_VA", cache_op::FLAG_VA.into()),
        ("CACHE_RESULT_WIDENED", cache_op::RESULT_WIDENED.into()),
        ("BATCH_ENTRY_SIZE", batch::ENTRY_SIZE.into()),
        ("BATCH_ARRAY_ALIGN", batch::ARRAY_ALIGN.into()),
        ("BATCH_ENTRIES_PER_CALL", batch::ENTRIES_PER_CALL.into()),
        ("BATCH_MAX_ENTRIES", batch::MAX_ENTRIES.into()),
        ("BATCH_COOKIE_ENTRY_SHIFT", batch::COOKIE_ENTRY_SHIFT.into()),
        ("PAGE_SIZE", PAGE_SIZE.into()),
        ("MAX_STALLED_CALLS", driver::MAX_STALLED_CALLS.into()),
    ];
    let uuid = stagehand_abi::uuid_words();
    let uuid_names = ["UUID_W0", "UUID_W1", "UUID_W2", "UUID_W3"];
    values.extend(
        uuid_names
            .iter()
            .zip(uuid)
            .map(|(n, w)| (*n, i128::from(w))),
    );
    let mut map: BTreeMap<String, i128> = values
        .into_iter()
        .map(|(name, value)| (format!("STAGEHAND_{name}"), value))
        .collect();
    for status in Status::ALL {
        map.insert(format!("STAGEHAND_{}", status.name()), status.code().into());
    }
    map
}

/// Parses a C integer literal as the header writes them: decimal or hex, an optional `u`
/// suffix, a negative number in parentheses.
fn parse_value(text: &str) -> Option<i128> {
    let text = text.trim();
    let (negative, body) = match text.strip_prefix("(-").and_then(|t| t.strip_suffix(')')) {
        Some(inner) => (true, inner),
        None => (false, text),
    };
    let body = body.trim_end_matches(['u', 'U']);
    let magnitude = match body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        Some(hex) => i128::from_str_radix(hex, 16).ok()?,
        None => body.parse::<i128>().ok()?,
    };
    Some(if negative { -magnitude } else { magnitude })
}

/// The header's `#define NAME VALUE` lines, in order.
fn header_defines() -> Vec<(String, Option<String>)> {
    HEADER
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("#define"))
        .map(|rest| {
            let rest = rest.trim();
            match rest.split_once(char::is_whitespace) {
                Some((name, value)) => (name.to_string(), Some(value.trim().to_string())),
                None => (rest.to_string(), None),
            }
        })
        .collect()
}

#[test]
fn every_define_matches_the_rust_value() {
    let expected = expected();
    let mut seen = BTreeMap::new();
    for (name, value) in header_defines() {
        let Some(value) = value else {
            assert_eq!(
                name, GUARD,
                "a define without a value that is not the include guard"
            );
            continue;
        };
        let Some(&want) = expected.get(&name) else {
            panic!("stagehand.h defines {name} = {value}, which the Rust ABI does not know");
        };
        let got = parse_value(&value)
            .unwrap_or_else(|| panic!("{name}: cannot read the value {value:?}"));
        assert_eq!(got, want, "{name}: header says {value}, Rust says {want}");
        assert!(
            seen.insert(name.clone(), got).is_none(),
            "{name} defined twice"
        );
    }
    let missing: Vec<&String> = expected.keys().filter(|n| !seen.contains_key(*n)).collect();
    assert!(missing.is_empty(), "stagehand.h lacks {missing:?}");
}

#[test]
fn the_value_parser_reads_what_the_header_writes() {
    assert_eq!(parse_value("0xC6000021u"), Some(0xC600_0021));
    assert_eq!(parse_value("(-10)"), Some(-10));
    assert_eq!(parse_value("24"), Some(24));
    assert_eq!(parse_value("0x00u"), Some(0));
    assert_eq!(
        parse_value("1 << 3"),
        None,
        "expressions are refused, not misread"
    );
}

#[test]
fn the_header_declares_the_batch_entry_as_the_rust_struct() {
    // Field order and types, as written; sizes and offsets are checked by the header's own
    // _Static_asserts when it compiles.
    let body = HEADER
        .split("struct stagehand_batch_entry {")
        .nth(1)
        .and_then(|rest| rest.split("};").next())
        .expect("struct stagehand_batch_entry in the header");
    let fields: Vec<String> = body
        .lines()
        .filter_map(|line| line.split(';').next())
        .map(|decl| decl.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|decl| !decl.is_empty())
        .collect();
    assert_eq!(
        fields,
        [
            "uint64_t addr",
            "uint64_t size",
            "uint32_t op",
            "uint32_t reserved"
        ]
    );
    assert_eq!(std::mem::size_of::<driver::BatchEntry>(), 24);
}

#[test]
fn the_header_declares_the_dma_segment_as_the_rust_struct() {
    let body = HEADER
        .split("struct stagehand_dma_segment {")
        .nth(1)
        .and_then(|rest| rest.split("};").next())
        .expect("struct stagehand_dma_segment in the header");
    let fields: Vec<String> = body
        .lines()
        .filter_map(|line| line.split(';').next())
        .map(|decl| decl.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|decl| !decl.is_empty())
        .collect();
    assert_eq!(
        fields,
        ["uint64_t addr", "uint64_t size", "uint64_t handle"]
    );
    assert_eq!(
        std::mem::size_of::<dma_sg::Segment>() as u64,
        dma_sg::SEGMENT_SIZE
    );
    assert_eq!(
        std::mem::offset_of!(dma_sg::Segment, handle) as u64,
        dma_sg::HANDLE_OFFSET
    );
}

fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

fn user_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/header_user.c")
}

/// Runs `compiler args` on the header user; `None` if the compiler cannot be started.
fn compile(compiler: &str, args: &[&str]) -> Option<std::process::Output> {
    Command::new(compiler)
        .args(args)
        .arg("-I")
        .arg(include_dir())
        .arg(user_file())
        .output()
        .ok()
}

#[test]
fn the_header_compiles_for_the_host() {
    let flags = [
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Wpedantic",
        "-Werror",
        "-fsyntax-only",
    ];
    let Some(output) = compile("gcc", &flags) else {
        eprintln!("gcc is not installed: the C syntax check is skipped");
        return;
    };
    assert!(
        output.status.success(),
        "gcc rejects stagehand.h:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_header_compiles_in_a_kernel_build_without_libc_headers() {
    // `__KERNEL__` and no system include directories: the header must take its types from
    // <linux/types.h> alone (here a stand-in with the kernel's names).
    let kernel_include = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/kernel");
    let kernel_include = kernel_include.to_string_lossy().into_owned();
    let flags = [
        "-std=gnu11",
        "-D__KERNEL__",
        "-nostdinc",
        "-I",
        &kernel_include,
        "-Wall",
        "-Wextra",
        "-Werror",
        "-fsyntax-only",
    ];
    let Some(output) = compile("gcc", &flags) else {
        eprintln!("gcc is not installed: the C syntax check is skipped");
        return;
    };
    assert!(
        output.status.success(),
        "stagehand.h needs a C library header in a kernel build:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_header_compiles_for_aarch64_where_a_compiler_exists() {
    // The HVC wrappers only exist for aarch64; check them wherever a compiler for it exists.
    let flags = [
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Wpedantic",
        "-Werror",
        "-O2",
        "-c",
        "-o",
    ];
    let candidates: [(&str, &[&str]); 2] = [
        ("aarch64-linux-gnu-gcc", &[]),
        ("clang", &["--target=aarch64-none-elf", "-ffreestanding"]),
    ];
    let object = std::env::temp_dir().join(format!("stagehand-header-{}.o", std::process::id()));
    for (compiler, extra) in candidates {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(flags);
        let object = object.to_str().expect("temporary path is UTF-8");
        args.push(object);
        let Some(output) = compile(compiler, &args) else {
            continue;
        };
        let _ = std::fs::remove_file(object);
        assert!(
            output.status.success(),
            "{compiler} rejects stagehand.h:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        return;
    }
    eprintln!("no aarch64 C compiler: the HVC wrappers were not compiled");
}
