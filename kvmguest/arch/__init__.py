"""Architecture-specific code: x86 (the only one today)."""
