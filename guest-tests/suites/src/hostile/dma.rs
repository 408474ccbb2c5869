//! DMA attacks with edu.
use alloc::string::String;
pub(crate) fn audit_order_interleaving() -> Result<(), String> { Err("not written".into()) }
pub(crate) fn strict_map_of_a_mixed_nc_wb_range() -> Result<(), String> { Err("not written".into()) }
pub(crate) fn escapes_are_blocked() -> Result<(), String> { Err("not written".into()) }
pub(crate) fn split_merge_race_loses_no_write() -> Result<(), String> { Err("not written".into()) }
