//! Reset entry (boot CPU, from flash) and PSCI CPU_ON entry (secondary CPUs).

use core::arch::global_asm;

/// Bytes of stack per physical CPU (the linker script reserves `MAX_CPUS` of them).
pub const STACK_SIZE: u64 = 0x10000;
/// Physical CPUs the hypervisor supports (stacks reserved by the linker script).
pub const MAX_CPUS: usize = 16;

// QEMU starts the boot CPU at EL2 at physical address 0 (flash), MMU and caches off; the other
// CPUs stay off until PSCI CPU_ON. The image is linked for RAM: copy it there, zero .bss, make
// the copied instructions visible to instruction fetch, and continue at the RAM address. Only
// PC-relative addressing is used before the branch.
global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    adr     x0, _start
    ldr     x1, =__image_start
    ldr     x2, =__image_copy_end
0:  ldp     x3, x4, [x0], #16
    stp     x3, x4, [x1], #16
    cmp     x1, x2
    b.lo    0b
    ldr     x1, =__bss_start
    ldr     x2, =__bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:  dsb     sy
    ic      iallu
    dsb     sy
    isb
    ldr     x0, =3f
    br      x0
3:  ldr     x0, =__stacks_start
    add     sp, x0, #{stack_size}
    mov     x0, #0
    bl      boot_cpu_main
4:  wfe
    b       4b

    // PSCI CPU_ON target: x0 = this CPU's index. MMU off. The boot CPU published the EL2 MMU
    // configuration in SECONDARY_MMU and cleaned it to the point of coherency.
    .global secondary_entry
secondary_entry:
    mov     x19, x0
    ldr     x1, =__stacks_start
    mov     x2, #{stack_size}
    madd    x1, x19, x2, x1
    add     sp, x1, x2
    ldr     x1, =SECONDARY_MMU
    ldp     x2, x3, [x1]
    ldp     x4, x5, [x1, #16]
    msr     mair_el2, x2
    msr     tcr_el2, x3
    msr     ttbr0_el2, x4
    isb
    tlbi    alle2
    dsb     nsh
    isb
    msr     sctlr_el2, x5
    isb
    mov     x0, x19
    bl      secondary_cpu_main
5:  wfe
    b       5b
    .ltorg
"#,
    stack_size = const STACK_SIZE,
);

unsafe extern "C" {
    /// Entry point given to the firmware's PSCI CPU_ON.
    pub fn secondary_entry();
}
