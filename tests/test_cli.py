"""The `kvmguest` command, as a user runs it."""

from helpers import cli as kvmguest
from helpers import guest


def test_run_streams_console_and_exits_with_guest_result():
    p = kvmguest("run", guest("hello"), "--cmdline", "from=cli", "--memory", "32M")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Hello from a kvmguest guest!\ncmdline: from=cli\n"  # \r\n folded


def test_run_bad_kernel_is_one_line_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"hello")
    p = kvmguest("run", bad)
    assert p.returncode == 2
    assert p.stderr == (f"kvmguest: error: {bad}: not an ELF file, a Linux bzImage or a file "
                        "with a multiboot header\n")


def test_run_timeout_exits_124():
    p = kvmguest("run", guest("spin"), "--timeout", "0.5")
    assert p.returncode == 124
    assert "did not finish within 0.5 s" in p.stderr


def test_run_triple_fault_exits_123_with_registers():
    p = kvmguest("run", guest("fault"))
    assert p.returncode == 123
    assert "triple-faulted" in p.stderr and "rip=" in p.stderr


def test_bad_memory_size_is_a_usage_error():
    p = kvmguest("run", guest("hello"), "--memory", "lots")
    assert p.returncode == 2 and "bad size 'lots'" in p.stderr


def test_info_reports_backend_and_capabilities():
    p = kvmguest("info")
    assert p.returncode == 0, p.stderr
    assert "KVM API version: 12" in p.stdout
    assert "backend module:" in p.stdout
    assert "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2" in p.stdout
