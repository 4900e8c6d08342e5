/* The ELF note every Linux build carries (include/linux/build-salt.h: owner "Linux", type
 * LINUX_ELFNOTE_BUILD_SALT): hello-linux.elf is hello with it. */
    .section .note.Linux, "a", @note
    .balign 4
    .long 6                 /* namesz: "Linux\0" */
    .long 4                 /* descsz */
    .long 0x100             /* LINUX_ELFNOTE_BUILD_SALT */
    .asciz "Linux"
    .balign 4
    .long 0
    .balign 4
    .section .note.GNU-stack, "", @progbits
