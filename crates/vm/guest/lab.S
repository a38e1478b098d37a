/*
 * The lab machine's KVM guest: 32-bit protected mode, flat segments, no paging, no
 * interrupts. The VMM loads this flat binary at GUEST_LOAD and starts each vCPU at its
 * first byte with %esi pointing at the vCPU's mailbox and %esp at its stack.
 *
 * Each vCPU writes its slice of the hot set, pass after pass: the first and the last
 * 32-bit word of every page get the pass number. With verify set, it first checks that
 * both words still hold the previous pass; a page a migration failed to resend holds an
 * older pass on the destination, and is reported on the serial port.
 *
 * x86 pages are 4 KiB architecturally, hence the constants below.
 */
        .code32
        .set COM1, 0x3f8
        .set POST_PORT, 0x80
        .set PAGE, 4096
        .set LAST_WORD, PAGE - 4

        /* Mailbox layout (offsets from %esi); kept in sync with src/kvm.rs. */
        .set MB_HOT_BASE, 0      /* guest-physical address of the first page */
        .set MB_HOT_PAGES, 4     /* pages in this vCPU's slice */
        .set MB_VERIFY, 8        /* non-zero: check before writing */
        .set MB_PASS, 12         /* the pass being written, from 1 */
        .set MB_VIOLATIONS, 16
        .set MB_WRITTEN_LO, 20   /* pages written, 64-bit */
        .set MB_WRITTEN_HI, 24
        .set MB_PRINT, 28        /* non-zero: print a line per pass */
        .set MB_CPU, 32          /* vCPU index, for messages */

        .globl _start
_start:
        cmpl $0, MB_PRINT(%esi)
        je pass_loop
        mov $banner, %ebp
        call puts

pass_loop:
        mov MB_PASS(%esi), %ebx         /* pass being written */
        lea -1(%ebx), %edx              /* the pass every page must hold */
        mov MB_HOT_BASE(%esi), %edi
        mov MB_HOT_PAGES(%esi), %ecx
        test %ecx, %ecx
        jz idle
page_loop:
        cmpl $0, MB_VERIFY(%esi)
        je write_page
        cmp %edx, (%edi)
        jne violation
        cmp %edx, LAST_WORD(%edi)
        jne violation
write_page:
        mov %ebx, (%edi)
        mov %ebx, LAST_WORD(%edi)
        addl $1, MB_WRITTEN_LO(%esi)
        adcl $0, MB_WRITTEN_HI(%esi)
        add $PAGE, %edi
        dec %ecx
        jz pass_done
        test $0xff, %ecx
        jnz page_loop
        /* Every 256 pages, a write to the POST port: an exit that lets the VMM stop
           this vCPU promptly even when a pass is long. */
        out %al, $POST_PORT
        jmp page_loop

pass_done:
        inc %ebx
        mov %ebx, MB_PASS(%esi)
        cmpl $0, MB_PRINT(%esi)
        je pass_loop
        mov $msg_pass, %ebp
        call puts
        lea -1(%ebx), %eax
        call puthex
        mov $msg_eol, %ebp
        call puts
        jmp pass_loop

violation:
        incl MB_VIOLATIONS(%esi)
        push %edx
        mov $msg_violation, %ebp
        call puts
        mov MB_CPU(%esi), %eax
        call puthex
        mov $msg_page, %ebp
        call puts
        mov %edi, %eax
        call puthex
        mov $msg_found, %ebp
        call puts
        mov (%edi), %eax
        call puthex
        mov $msg_eol, %ebp
        call puts
        pop %edx
        jmp write_page

idle:
        hlt
        jmp pass_loop

/* puts: prints the NUL-terminated string at %ebp. Clobbers %eax, %ebp. */
puts:
        push %edx
        mov $COM1, %dx
1:      movb (%ebp), %al
        test %al, %al
        jz 2f
        out %al, %dx
        inc %ebp
        jmp 1b
2:      pop %edx
        ret

/* puthex: prints %eax as 8 hex digits. Clobbers %eax, %ebp. */
puthex:
        push %ecx
        push %edx
        mov %eax, %ebp
        mov $8, %ecx
        mov $COM1, %dx
3:      rol $4, %ebp
        mov %ebp, %eax
        and $0xf, %eax
        movb hexdigits(%eax), %al
        out %al, %dx
        dec %ecx
        jnz 3b
        pop %edx
        pop %ecx
        ret

hexdigits:      .ascii "0123456789abcdef"
banner:         .asciz "lab guest: running\n"
msg_pass:       .asciz "pass "
msg_eol:        .asciz "\n"
msg_violation:  .asciz "VIOLATION cpu "
msg_page:       .asciz " page "
msg_found:      .asciz " holds "
