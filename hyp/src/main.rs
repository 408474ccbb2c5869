//! stagehand: an EL2 hypervisor booted as QEMU `virt` firmware.
#![no_std]
#![no_main]

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
