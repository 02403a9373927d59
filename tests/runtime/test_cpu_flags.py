"""kdjax.runtime.cpu_flags: the CPU flags are appended to XLA_FLAGS, a user's own setting wins, and the
`kdjax` command sets them."""

from kdjax.runtime.cpu_flags import CPU_FLAGS, add_cpu_flags
from tests.python_process import run_python


def test_flags_are_appended_to_the_existing_ones():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    add_cpu_flags(environ)
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *CPU_FLAGS]
    add_cpu_flags(environ)  # idempotent
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *CPU_FLAGS]
    empty = {}
    add_cpu_flags(empty)
    assert empty["XLA_FLAGS"].split() == list(CPU_FLAGS)


def test_a_users_own_setting_wins():
    for mine in ("--xla_cpu_enable_concurrency_optimized_scheduler=true",
                 "--xla_cpu_prefer_vector_width=256"):
        environ = {"XLA_FLAGS": mine}
        add_cpu_flags(environ)
        option = mine.split("=")[0]
        assert environ["XLA_FLAGS"].split() == [mine] + [
            flag for flag in CPU_FLAGS if not flag.startswith(option + "=")]


def test_the_kdjax_command_sets_them():
    # A command that fails at once (no such config): the flags are set first, whatever follows.
    stdout = run_python("import os\n"
                        "from kdjax.commands import main as cli\n"
                        "cli.main(['train', '--config=/nonexistent/config.py', '--workdir=/nonexistent'])\n"
                        "print(os.environ['XLA_FLAGS'])\n")
    assert stdout.split()[-len(CPU_FLAGS):] == list(CPU_FLAGS)
