"""What a patched re-apply (harness.deploy.patch) takes from the texts without a kernel: which
rules a new text replaces, and the rules' identities after it, as a full apply would write
them for the next carry-over."""

from __future__ import annotations

from codegen.rules import parse
from codegen.rules.iptables_save import write_rule
from codegen.tc.layout import CounterLayout
from harness.deploy.carry import identities_of, identities_replaced
from harness.deploy.patch import changed_rules

HEAD = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:mine - [0:0]\n"
RULES = [
    "-A INPUT -s 198.18.0.0/24 -j DROP",
    "-A INPUT -s 198.18.1.0/24 -j mine",
    "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
    "-A mine -s 198.18.1.1/32 -j ACCEPT",
    "-A mine -s 198.18.1.2/32 -j ACCEPT",
]


def _text(rules: list[str], policy: str = "DROP") -> str:
    return HEAD.replace("INPUT DROP", f"INPUT {policy}") + "\n".join(rules) + "\nCOMMIT\n"


def _previous(text: str) -> dict:
    ruleset = parse(text, "old.rules")
    identities = identities_of(ruleset, CounterLayout.of(ruleset))
    return {"rules": text, "identities": [[list(k), list(p)] for k, p in identities.items()]}


def test_rule_lines_replaced_are_found_and_others_refuse_a_patch():
    old = _text(RULES)
    new_rules = [*RULES]
    new_rules[0] = "-A INPUT -s 198.18.0.0/25 -j DROP"
    new_rules[4] = "-A mine -p udp -m udp --dport 53 -j ACCEPT"
    ruleset = parse(_text(new_rules), "new.rules")
    changes = changed_rules(_previous(old), _text(new_rules), ruleset)
    assert [(c.chain, c.index) for c in changes] == [("INPUT", 1), ("mine", 2)]
    assert write_rule("mine", changes[1].old) == RULES[4]
    assert write_rule("mine", changes[1].new) == new_rules[4]
    # Respelled only (the same rule as iptables-save writes it): nothing to patch.
    respelled = [*RULES]
    respelled[2] = "-A INPUT -p 6 -m tcp --dport 22 -j ACCEPT"
    same = changed_rules(_previous(old), _text(respelled), parse(_text(respelled), "r"))
    assert same == []
    # A policy, an added rule: not a patch.
    for text in (_text(RULES, "ACCEPT"), _text([*RULES, "-A INPUT -j DROP"])):
        assert changed_rules(_previous(old), text, parse(text, "new.rules")) is None


def test_identities_after_a_patch_are_what_a_full_apply_writes():
    old = _text(RULES)
    new_rules = [*RULES]
    new_rules[3] = "-A mine -s 198.18.1.3/32 -j ACCEPT"
    ruleset = parse(_text(new_rules), "new.rules")
    changes = changed_rules(_previous(old), _text(new_rules), ruleset)
    assert identities_replaced(_previous(old), changes) == identities_of(
        ruleset, CounterLayout.of(ruleset)
    )
    # A new text that repeats another rule's: the repeats' numbers move, so none is made.
    new_rules[3] = RULES[4]
    ruleset = parse(_text(new_rules), "new.rules")
    changes = changed_rules(_previous(old), _text(new_rules), ruleset)
    assert identities_replaced(_previous(old), changes) is None
