"""Front-ends: what prints, parses arguments, owns sockets and processes (the CLI, the
run/restore session, the gdb stub, the control socket, the pytest plugin). They may import
the VMM core (kvmguest) and the snapshot library (migrate); neither imports them."""
