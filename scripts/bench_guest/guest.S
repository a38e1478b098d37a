/*
 * Dirtying guest for QEMU in scripts/bench.py's `live` scenario.
 *
 * A boot sector (BIOS loads it at 0x7c00) that enters 32-bit protected mode without
 * paging and sweeps guest RAM [HOT_BASE, HOT_BASE + HOT_PAGES * 4 KiB) over and over,
 * incrementing one byte in every 4 KiB page: each write dirties one page. Every
 * MARK_PAGES pages it writes one byte to COM1, so the size of the serial log counts the
 * pages written.
 *
 * Pacing: the HPET main counter (100 MHz in QEMU, stopped with the VM) is the clock. At
 * counter value C the guest may have written C * PAGES_PER_COUNT_X2_32 / 2^32 pages. It
 * writes in batches up to that allowance; when it is ahead it halts until the next PIT
 * tick (1 kHz), so a paced guest leaves the host CPU idle. When it falls behind it
 * writes flat out, but drops any backlog beyond MAX_LAG_PAGES. Pages are counted modulo
 * 2^32 and compared by signed difference.
 *
 * Symbols given with --defsym: HOT_PAGES, PAGES_PER_COUNT_X2_32, MARK_PAGES,
 * MAX_LAG_PAGES, PIT_DIVISOR. Registers while writing: edi = page being written,
 * esi = pages written, ebp = pages until the next serial mark, ecx = pages left in the
 * batch.
 */
    .set HOT_BASE,     0x100000    /* 1 MiB: above the BIOS and VGA holes */
    .set HOT_END,      HOT_BASE + HOT_PAGES * 4096
    .set GUEST_PAGE,   4096        /* x86 page: the unit both engines track */
    .set IDT_BASE,     0x4000      /* 48 gates, built at run time */
    .set IDT_GATES,    48
    .set STACK_TOP,    0x6ff0
    .set COM1,         0x3f8
    .set HPET_BASE,    0xfed00000
    .set HPET_PERIOD,  HPET_BASE + 0x04   /* counter period in femtoseconds */
    .set HPET_CONFIG,  HPET_BASE + 0x10
    .set HPET_COUNTER, HPET_BASE + 0xf0
    .set HPET_PERIOD_FS, 10000000  /* the 100 MHz PAGES_PER_COUNT_X2_32 is computed for */

    .code16
    .text
    .globl _start
_start:
    cli
    xorw    %ax, %ax
    movw    %ax, %ds
    movw    %ax, %ss
    movw    $0x7c00, %sp
    inb     $0x92, %al             /* A20 through the system control port */
    orb     $0x02, %al
    andb    $0xfe, %al
    outb    %al, $0x92
    lgdtl   gdt_pointer
    movl    %cr0, %eax
    orl     $1, %eax
    movl    %eax, %cr0
    ljmpl   $0x08, $protected

    .code32
protected:
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    %ax, %fs
    movw    %ax, %gs
    movl    $STACK_TOP, %esp

    /* A counter of another period would pace at the wrong rate: stop instead. */
    cmpl    $HPET_PERIOD_FS, HPET_PERIOD
    jne     on_exception
    orl     $1, HPET_CONFIG        /* ENABLE_CNF; legacy routing stays off */

    /* IDT: exceptions stop the vCPU, vectors 0x20..0x2f (PIT and spurious) wake it. */
    movl    $IDT_BASE, %edi
    xorl    %ecx, %ecx
build_gate:
    movl    $on_exception, %eax
    cmpl    $0x20, %ecx
    jb      1f
    movl    $on_irq, %eax
1:  movw    %ax, (%edi)
    movw    $0x08, 2(%edi)
    movw    $0x8e00, 4(%edi)       /* present, ring 0, 32-bit interrupt gate */
    shrl    $16, %eax
    movw    %ax, 6(%edi)
    addl    $8, %edi
    incl    %ecx
    cmpl    $IDT_GATES, %ecx
    jb      build_gate
    lidtl   idt_pointer

    /* 8259 pair: IRQ 0-7 -> vectors 0x20-0x27, 8-15 -> 0x28-0x2f; only IRQ 0 unmasked. */
    movb    $0x11, %al
    outb    %al, $0x20
    outb    %al, $0xa0
    movb    $0x20, %al
    outb    %al, $0x21
    movb    $0x28, %al
    outb    %al, $0xa1
    movb    $0x04, %al
    outb    %al, $0x21
    movb    $0x02, %al
    outb    %al, $0xa1
    movb    $0x01, %al
    outb    %al, $0x21
    outb    %al, $0xa1
    movb    $0xfe, %al
    outb    %al, $0x21
    movb    $0xff, %al
    outb    %al, $0xa1

    /* PIT channel 0, lobyte/hibyte, mode 2 (rate generator): the wake-up tick. */
    movb    $0x34, %al
    outb    %al, $0x43
    movb    $(PIT_DIVISOR & 0xff), %al
    outb    %al, $0x40
    movb    $(PIT_DIVISOR >> 8), %al
    outb    %al, $0x40

    xorl    %esi, %esi
    movl    $MARK_PAGES, %ebp
    movl    $HOT_BASE, %edi
next_batch:
    /* eax = allowance = (counter * PAGES_PER_COUNT_X2_32) >> 32, modulo 2^32 */
1:  movl    HPET_COUNTER + 4, %ecx
    movl    HPET_COUNTER, %eax
    cmpl    HPET_COUNTER + 4, %ecx
    jne     1b                     /* the low half wrapped between the reads */
    movl    $PAGES_PER_COUNT_X2_32, %edx
    mull    %edx
    imull   $PAGES_PER_COUNT_X2_32, %ecx, %ecx
    leal    (%ecx,%edx), %eax
    movl    %eax, %ecx
    subl    %esi, %ecx             /* pages the guest may write now */
    jle     wait_tick
    cmpl    $MAX_LAG_PAGES, %ecx
    jbe     write_page
    movl    $MAX_LAG_PAGES, %ecx   /* too far behind: drop the excess backlog */
    movl    %eax, %esi
    subl    %ecx, %esi
write_page:
    incb    (%edi)
    incl    %esi
    addl    $GUEST_PAGE, %edi
    cmpl    $HOT_END, %edi
    jb      1f
    movl    $HOT_BASE, %edi
1:  decl    %ebp
    jnz     2f
    movl    $MARK_PAGES, %ebp
    movw    $COM1, %dx
    movb    $'.', %al
    outb    %al, %dx
2:  decl    %ecx
    jnz     write_page
    jmp     next_batch

wait_tick:
    sti                            /* the interrupt shadow covers hlt: no lost wake-up */
    hlt
    jmp     wait_tick

/* Interrupts are only enabled in wait_tick, so the handler never returns there: it
 * drops the frame and goes back to the pacing check with interrupts off (no iret, which
 * KVM's instruction emulator cannot do in protected mode). An EOI for the spurious
 * IRQ 7 does no harm: nothing else is in service. */
on_irq:
    movb    $0x20, %al             /* non-specific EOI */
    outb    %al, $0x20
    movl    $STACK_TOP, %esp
    jmp     next_batch

on_exception:
    cli
    hlt
    jmp     on_exception

    .p2align 3
gdt:
    .quad   0
    .quad   0x00cf9a000000ffff     /* 0x08: flat 32-bit code */
    .quad   0x00cf92000000ffff     /* 0x10: flat data */
gdt_pointer:
    .word   gdt_pointer - gdt - 1
    .long   gdt
idt_pointer:
    .word   IDT_GATES * 8 - 1
    .long   IDT_BASE

    .org    510
    .byte   0x55, 0xaa
