"""The snapshot formats kvmguest reads, a module each: ``mapped`` (ours, docs/FORMAT.md),
``stream`` (our streaming baseline), ``checkpoint`` (continuous checkpoints) and ``qemu``
(QEMU's migration files). Each owns its layout, validation, load, describe and export
(a ``SnapshotReader``); ``base`` holds what they share; migrate.snapshot sniffs a file
once and picks the reader."""
