"""x86: the guest-physical layout, kernel images and their boot protocols (PVH, multiboot,
Linux bzImage), the vCPU start state and CPUID, ACPI tables, firmware leftovers, and the
VM-wide platform (Platform: capabilities, slots, irqchip, PIT, clock)."""
