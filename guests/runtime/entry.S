/*
 * PVH entry for the kvmguest test guests.
 *
 * The VMM (ours or QEMU) enters pvh_start in 32-bit protected mode, paging off,
 * with %ebx = physical address of hvm_start_info.  We identity-map the first 8 MiB
 * with 2 MiB pages (the C runtime maps the rest of RAM from the memory map),
 * switch to long mode, load our own GDT/TSS/IDT and call rt_main(start_info).
 */
#define CR0_PE      (1 << 0)
#define CR0_MP      (1 << 1)
#define CR0_EM      (1 << 2)
#define CR0_PG      (1 << 31)
#define CR4_PAE     (1 << 5)
#define CR4_OSFXSR  (1 << 9)
#define CR4_OSXMMEXCPT (1 << 10)
#define MSR_EFER    0xC0000080
#define EFER_LME    (1 << 8)
#define PTE_P_RW_US 0x7
#define PDE_LARGE   0x87      /* present, writable, user, 2 MiB page */
#define BOOT_MAPPED_2M 4      /* entry maps the first 8 MiB (the image lives there); rt.c the rest */
#define AP_STACK_SHIFT 14     /* 16 KiB a CPU */

/* Flat data segments in long mode. */
.macro LOAD_DATA_SEGMENTS
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
.endm

/* From 32-bit protected mode to long mode, with rt_pml4 (both the boot CPU and the APs). */
.macro ENTER_LONG_MODE target
    movl %cr4, %eax
    orl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    movl %eax, %cr4
    movl $rt_pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    andl $~CR0_EM, %eax
    orl $(CR0_PE | CR0_MP | CR0_PG), %eax
    movl %eax, %cr0
    lgdt rt_gdt_ptr
    ljmp $0x08, $\target
.endm

    /* The PVH note: Xen's XEN_ELFNOTE_PHYS32_ENTRY (18), a 32-bit entry point. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .balign 4
    .long pvh_start

    .section .text.boot, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    movl %ebx, rt_start_info_paddr
    movl $boot_stack_top, %esp

    /* PML4[0] -> PDPT, PDPT[0] -> first PD; PD[i] = i * 2 MiB. */
    movl $rt_pdpt, %eax
    orl $PTE_P_RW_US, %eax
    movl %eax, rt_pml4
    movl $rt_pd_pool, %eax
    orl $PTE_P_RW_US, %eax
    movl %eax, rt_pdpt
    xorl %ecx, %ecx
    movl $rt_pd_pool, %edi
1:  movl %ecx, %eax
    shll $21, %eax
    orl $PDE_LARGE, %eax
    movl %eax, (%edi,%ecx,8)
    incl %ecx
    cmpl $BOOT_MAPPED_2M, %ecx
    jne 1b

    ENTER_LONG_MODE long_entry

    .code64
long_entry:
    LOAD_DATA_SEGMENTS
    movabsq $boot_stack_top, %rsp
    movl rt_start_info_paddr, %edi
    call rt_main
2:  cli
    hlt
    jmp 2b

/*
 * AP bring-up. The boot CPU copies ap_trampoline (16-bit code) to TRAMPOLINE (0x8000)
 * and sends INIT + SIPI with vector 0x08: the AP starts in real mode at 0x0800:0000,
 * loads our GDT, enters protected mode and jumps into the image (ap_entry32), where it
 * takes the boot CPU's page tables into long mode and calls rt_ap_main on its own stack.
 */
#define TRAMPOLINE 0x8000
    .code16
    .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
    cli
    cld
    lgdtl %cs:(ap_gdt_ptr - ap_trampoline)
    movl %cr0, %eax
    orl $CR0_PE, %eax
    movl %eax, %cr0
    ljmpl $0x18, $ap_entry32
    .balign 4
ap_gdt_ptr:
    .word rt_gdt_end - rt_gdt - 1
    .long rt_gdt
ap_trampoline_end:

    .code32
ap_entry32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    ENTER_LONG_MODE ap_long

    .code64
ap_long:
    LOAD_DATA_SEGMENTS
    movl $1, %eax
    lock xaddl %eax, rt_ap_next          /* this AP's slot: 1, 2, ... */
    incl %eax
    movl %eax, %edi
    movq %rdi, %rsp
    shlq $AP_STACK_SHIFT, %rsp
    addq $rt_ap_stacks, %rsp             /* the top of its 16 KiB */
    call rt_ap_main
4:  cli
    hlt
    jmp 4b

/* Interrupt stubs for vectors 32..255: push the vector, save the caller-saved registers,
 * call rt_interrupt(vector), restore, iretq. */
    .text
    .balign 16
    .globl rt_irq_stubs
rt_irq_stubs:
    .set vec, 32
    .rept 224
    .balign 16
    pushq $vec
    jmp irq_common
    .set vec, vec + 1
    .endr
irq_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbp
    movq 80(%rsp), %rdi                  /* the vector */
    movq %rsp, %rbp
    andq $~0xf, %rsp
    call rt_interrupt
    movq %rbp, %rsp
    popq %rbp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $8, %rsp
    iretq

/* Exception stubs: push a dummy error code where the CPU pushes none. */
    .text
#define EXC_NOERR(n) exc_##n: pushq $0; pushq $n; jmp exc_common
#define EXC_ERR(n)   exc_##n: pushq $n; jmp exc_common
EXC_NOERR(0)
EXC_NOERR(1)
EXC_NOERR(2)
EXC_NOERR(3)
EXC_NOERR(4)
EXC_NOERR(5)
EXC_NOERR(6)
EXC_NOERR(7)
EXC_ERR(8)
EXC_NOERR(9)
EXC_ERR(10)
EXC_ERR(11)
EXC_ERR(12)
EXC_ERR(13)
EXC_ERR(14)
EXC_NOERR(15)
EXC_NOERR(16)
EXC_ERR(17)
EXC_NOERR(18)
EXC_NOERR(19)
exc_common:
    movq %rsp, %rdi          /* -> struct rt_exc_frame */
    andq $~0xf, %rsp
    call rt_exception
3:  cli
    hlt
    jmp 3b

    .section .rodata
    .globl rt_exc_stubs
    .balign 8
rt_exc_stubs:
    .quad exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7, exc_8, exc_9
    .quad exc_10, exc_11, exc_12, exc_13, exc_14, exc_15, exc_16, exc_17, exc_18, exc_19

    .section .data
    .balign 16
    .globl rt_gdt
rt_gdt:
    .quad 0                       /* null */
    .quad 0x00af9a000000ffff      /* 0x08: 64-bit kernel code */
    .quad 0x00cf92000000ffff      /* 0x10: kernel data */
    .quad 0x00cf9a000000ffff      /* 0x18: 32-bit kernel code (unused) */
rt_gdt_end:
rt_gdt_ptr:
    .word rt_gdt_end - rt_gdt - 1
    .long rt_gdt
    .globl rt_start_info_paddr
rt_start_info_paddr:
    .long 0

    .section .bss
    .balign 4096
    .globl rt_pml4, rt_pdpt, rt_pd_pool
rt_pml4:    .skip 4096
rt_pdpt:    .skip 4096
rt_pd_pool: .skip 4096 * 64      /* 2 MiB pages for up to 64 GiB of guest-physical space */
boot_stack: .skip 16384
boot_stack_top:
    .globl rt_ap_stacks, rt_ap_next
    .balign 4096
rt_ap_stacks: .skip 16384 * 64       /* the n-th AP to arrive (n = 1, 2, ...) uses [(n-1) * 16K, n * 16K) */
rt_ap_next: .long 0
    .section .note.GNU-stack, "", @progbits
