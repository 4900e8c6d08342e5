"""Guest boot: the x86 layout, the PVH ELF loader and the vCPU start state."""
