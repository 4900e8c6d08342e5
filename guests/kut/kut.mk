# Builds kvmguest's own kvm-unit-tests tests in a kvm-unit-tests build folder, against its
# library: make -C BUILD -f Makefile -f kut.mk KVMGUEST_KUT=<this folder> x86/kvmguest_migrate.flat
# x86 does not link lib/migrate.c (and getchar) into libcflat; these tests need both.
# kvmguest_migrate_loop is a hostile test of the runner (tests/test_kut.py).
$(TEST_DIR)/kvmguest_migrate.elf $(TEST_DIR)/kvmguest_migrate_loop.elf: lib/migrate.o lib/getchar.o
lib/migrate.o lib/getchar.o: CFLAGS += -ffreestanding -I $(SRCDIR)/lib -I lib
$(TEST_DIR)/kvmguest_migrate.o: $(KVMGUEST_KUT)/kvmguest_migrate.c
	$(CC) $(CFLAGS) -c -o $@ $<
$(TEST_DIR)/kvmguest_migrate_loop.o: $(KVMGUEST_KUT)/kvmguest_migrate_loop.c
	$(CC) $(CFLAGS) -c -o $@ $<
