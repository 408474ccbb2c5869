//! Entry points: the boot CPU's `_start` (x0 = DTB), the secondary CPUs' PSCI CPU_ON entry
//! (x0 = context ID = CPU index), and the Rust code they call first.

use core::arch::global_asm;

use crate::{console, cpu, dt, heap, mmu};

/// Most CPUs a test guest supports; each has a stack of [`STACK_SIZE`] bytes.
pub const MAX_CPUS: usize = 8;
/// Bytes of stack per CPU.
pub const STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    mov     x19, x0
    msr     tpidr_el1, xzr
    mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    isb
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
0:  cmp     x1, x2
    b.hs    1f
    stp     xzr, xzr, [x1], #16
    b       0b
1:  adrp    x1, __stacks_start
    add     x1, x1, :lo12:__stacks_start
    mov     x2, #{stack_size}
    add     sp, x1, x2
    adrp    x1, __vectors
    add     x1, x1, :lo12:__vectors
    msr     vbar_el1, x1
    isb
    mov     x0, x19
    bl      {boot_main}
2:  wfe
    b       2b

    .global __secondary_entry
__secondary_entry:
    cmp     x0, #{max_cpus}
    b.hs    9f
    msr     tpidr_el1, x0
    mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    adrp    x1, __vectors
    add     x1, x1, :lo12:__vectors
    msr     vbar_el1, x1
    adrp    x1, {mmu_config}
    add     x1, x1, :lo12:{mmu_config}
    ldp     x2, x3, [x1]
    ldp     x4, x5, [x1, #16]
    msr     mair_el1, x2
    msr     tcr_el1, x3
    msr     ttbr0_el1, x4
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    msr     sctlr_el1, x5
    isb
    adrp    x1, __stacks_start
    add     x1, x1, :lo12:__stacks_start
    add     x2, x0, #1
    mov     x3, #{stack_size}
    madd    x1, x2, x3, x1
    mov     sp, x1
    bl      {secondary_main}
9:  wfe
    b       9b

    .section .bss.stacks, "aw", @nobits
    .balign 4096
    .global __stacks_start
__stacks_start:
    .space  {stacks_bytes}
    "#,
    stack_size = const STACK_SIZE,
    max_cpus = const MAX_CPUS,
    stacks_bytes = const STACK_SIZE * MAX_CPUS,
    boot_main = sym boot_main,
    secondary_main = sym secondary_main,
    mmu_config = sym mmu::SECONDARY_MMU_CONFIG,
);

unsafe extern "C" {
    /// The secondary CPU entry point (physical address = IPA: the image is identity mapped).
    fn __secondary_entry();
}

/// The address a PSCI CPU_ON must branch to for a secondary CPU of this runtime.
pub fn secondary_entry_address() -> u64 {
    __secondary_entry as *const () as usize as u64
}

unsafe extern "Rust" {
    /// The suite's main function, defined by [`crate::main!`].
    fn __guest_rt_main() -> !;
}

/// First Rust code on the boot CPU: heap, device tree, console, MMU, then the suite's main.
extern "C" fn boot_main(dtb: usize) -> ! {
    heap::init();
    let info = dt::init(dtb);
    console::init(info.uart_base);
    mmu::init(info);
    // SAFETY: `__guest_rt_main` is defined by the suite through `main!`, takes no arguments
    // and never returns.
    unsafe { __guest_rt_main() }
}

/// First Rust code on a secondary CPU (MMU already on, stack set): run the registered work.
extern "C" fn secondary_main(index: usize) -> ! {
    cpu::secondary_run(index)
}
