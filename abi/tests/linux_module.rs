//! Keeps the Linux module's audit line writer (guest-drivers/linux/audit.c, debugfs
//! `stagehand/audit`) in step with the line format of this crate: the same field names in the
//! same order, and the same kind names. (The runner's `linux-module` row then checks a real
//! line from the guest byte for byte against the hypervisor's stream.)

use stagehand_abi::audit::{kind, Record, KINDS};

const AUDIT_C: &str = include_str!("../../guest-drivers/linux/audit.c");

/// The `key=` names of a line or of a printf format, in order.
fn keys(text: &str) -> Vec<&str> {
    text.split(' ')
        .filter_map(|word| word.split_once('=').map(|(key, _)| key))
        .collect()
}

#[test]
fn the_module_writes_the_fields_of_the_line_format_in_order() {
    let format = AUDIT_C
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("\"AUDIT v%u "))
        .expect("audit.c has no \"AUDIT v%u ...\" format string");
    let format = format
        .trim_start_matches('"')
        .split("\\n\"")
        .next()
        .unwrap();
    let line = Record::empty(kind::DMA_MAP).to_string();
    assert!(line.starts_with("AUDIT v1 ") && format.starts_with("AUDIT v%u "));
    assert_eq!(keys(format), keys(&line));
}

#[test]
fn the_module_names_every_kind_as_the_line_format_does() {
    let start = AUDIT_C
        .find("sh_kinds[] = {")
        .expect("audit.c has no sh_kinds table");
    let table = &AUDIT_C[start..];
    let table = &table[table.find('{').unwrap() + 1..table.find('}').unwrap()];
    let names: Vec<&str> = table
        .split(',')
        .map(|entry| entry.trim().trim_matches('"'))
        .filter(|entry| !entry.is_empty())
        .collect();
    assert_eq!(names[0], "NULL", "kind 0 has no name");
    for (number, name) in KINDS {
        assert_eq!(
            names.get(number as usize),
            Some(&name),
            "kind {number} is {name} in the line format"
        );
    }
    assert_eq!(names.len(), KINDS.len() + 1);
}
