"""The GDB remote stub: ``wire`` (the protocol's bytes, no I/O), ``target`` (a machine as
gdb sees it), ``server`` (connections and the packet table)."""
