"""Packet scripts whose rules are iptables commands (harness.lab.commands): a command the
kernel refuses is a script error at its line with iptables' own words; the table the commands
leave under `bpflab exec` is compared with the kernel's, and a difference fails the replay."""

from __future__ import annotations

import pytest

from harness.lab import commands
from harness.lab.replay import replay
from harness.lab.scripts import ScriptError, load_script

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

SCRIPT = """description = "commands"
topology = "host"
commands = [
  "iptables -N web",
  "iptables -A web -p tcp --dport 80 -j ACCEPT",
  {bad}
]
[[packets]]
from = "client"
to = "host"
packet = 'TCP(dport=80, flags="S")'
expect = "pass"
"""


def test_a_command_the_kernel_refuses_is_an_error_at_its_line(tmp_path):
    path = tmp_path / "script.toml"
    path.write_text(SCRIPT.format(bad='"iptables -A INPUT -m nosuch -j ACCEPT",'))
    with pytest.raises(ScriptError) as caught:
        load_script(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:6: error: iptables-legacy refused the command"), message
    assert "nosuch" in message


def test_the_table_under_exec_must_be_the_kernels(tmp_path):
    path = tmp_path / "script.toml"
    path.write_text(SCRIPT.format(bad='"iptables -A INPUT -j web",'))
    script = load_script(path)
    assert "-A INPUT -j web" in script.rules_text
    assert replay(script).ok
    # A kernel table that is not what the commands give under exec: the replay says so.
    script.rules_text = script.rules_text.replace("--dport 80", "--dport 81")
    report = replay(script)
    assert not report.ok
    assert report.table is not None and "--dport 81" in report.table
    assert "MISMATCH: the commands' table" in report.render()
    assert commands.same_table(script.rules_text, script.rules_text) is None
