"""What a user sees when /dev/kvm cannot be used, and what the pytest plugin does then."""

import pytest

from helpers import cli, guest
from kvmguest.kvm import Kvm, KvmUnavailable

pytestmark = pytest.mark.nokvm


def test_missing_device_says_how_to_fix_it(tmp_path):
    with pytest.raises(KvmUnavailable, match="does not exist: load the KVM module"):
        Kvm(str(tmp_path / "kvm"))


def test_a_regular_file_is_not_a_kvm_device(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_text("")
    with pytest.raises(KvmUnavailable, match="is not a character device"):
        Kvm(str(fake))


def test_cli_error_is_one_line(tmp_path):
    p = cli("run", guest("hello"), env={"KVMGUEST_DEVICE": str(tmp_path / "nokvm")})
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "does not exist" in p.stderr


PLUGIN_TEST = """
import pytest

@pytest.mark.kvm
def test_needs_kvm(boot_guest):
    assert boot_guest({kernel!r}).exit_code == 0
"""


@pytest.mark.parametrize("ci,outcome", [("", "skipped"), ("true", "errors")])  # setup fails
def test_plugin_skips_without_kvm_but_fails_under_ci(pytester, tmp_path, ci, outcome):
    pytester.makepyfile(PLUGIN_TEST.format(kernel=str(guest("hello"))))
    env = {"KVMGUEST_DEVICE": str(tmp_path / "nokvm"), "CI": ci}
    for k, v in env.items():
        pytester._monkeypatch.setenv(k, v)
    pytester._monkeypatch.delenv("KVMGUEST_REQUIRE_KVM", raising=False)
    result = pytester.runpytest_subprocess("-rsf")   # the plugin loads by entry point
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines(["*does not exist*"])


def test_plugin_runs_the_guest_where_kvm_works(pytester):
    pytester.makepyfile(PLUGIN_TEST.format(kernel=str(guest("hello"))))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
