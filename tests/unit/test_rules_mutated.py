"""A rule file damaged on disk (bytes that are not UTF-8, NUL bytes, a truncated copy, random byte
flips) never ends `bpflab check` in a traceback: either it still parses, or the error is one
sentence that starts `FILE:LINE:COL:` (with the byte offset when the bytes are not text), printed
as every rule error is, with the offending line quoted under it, and exit code 2."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from codegen.rules import parse, write
from codegen.rules.iptables_save import ParseError
from codegen.rules.model import RuleError
from codegen.rules.text_file import decode_rules
from codegen.rules.validation import validate
from harness.lab.scripts import ScriptError, load_script

CORPUS = sorted((Path(__file__).resolve().parents[1] / "rules_corpus").glob("*.rules"))
LOCATED = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<column>\d+): error: \S")
INVALID_UTF8 = [  # (bytes, what Python's decoder calls the first bad byte)
    (b"\xff", "invalid start byte"),
    (b"\x80", "invalid start byte"),  # a continuation byte with no lead
    (b"\xc3(", "invalid continuation byte"),
    (b"\xed\xa0\x80", "invalid continuation byte"),  # an encoded surrogate
    (b"\xc0\xaf", "invalid start byte"),  # an overlong encoding of '/'
]
# Text after the corpus's ASCII, so that truncation can cut a character in two.
MULTIBYTE_TAIL = "# café ☃ 𝄞\n".encode()


def check_path(data: bytes, name: str) -> None:
    """What `bpflab check FILE` does with the bytes of FILE (cli_input.parse_rules, cli._check)."""
    ruleset = parse(decode_rules(data, name), name)
    validate(ruleset)
    write(ruleset)


def where(data: bytes, offset: int) -> tuple[int, int]:
    """LINE:COL of the byte at `offset`, computed apart from decode_rules to check it."""
    before = data[:offset]
    line_start = before.rfind(b"\n") + 1
    return before.count(b"\n") + 1, len(before[line_start:].decode()) + 1


def outcome(data: bytes, name: str, mutation: str) -> RuleError | None:
    """None when the mutant parses; the error when it is refused as a rule error should be."""
    try:
        check_path(data, name)
    except RuleError as error:
        text = str(error)
        found = LOCATED.match(text)
        assert found and found["file"] == name, f"{mutation}: not located: {text!r}"
        assert int(found["line"]) <= data.count(b"\n") + 2, f"{mutation}: line out of range"
        assert int(found["column"]) >= 1, mutation
        return error
    except Exception as error:  # the failure this file exists for: report the mutant, not crash
        pytest.fail(f"{mutation}: {type(error).__name__}: {error}")
    return None


def insertion_points(size: int) -> list[int]:
    return sorted({0, 1, size // 3, size // 2, max(0, size - 1), size})


@pytest.mark.parametrize("path", CORPUS, ids=lambda path: path.name)
def test_mutants_of_the_corpus_parse_or_name_the_place(path: Path) -> None:
    original = path.read_bytes()
    name = str(path)
    assert outcome(original, name, "original") is None, "the corpus itself must parse"

    for sequence, reason in INVALID_UTF8:
        for offset in insertion_points(len(original)):
            mutant = original[:offset] + sequence + original[offset:]
            error = outcome(mutant, name, f"{sequence!r} at {offset}")
            assert isinstance(error, ParseError), f"{sequence!r} at {offset} was accepted"
            line, column = where(mutant, offset)
            assert str(error).splitlines()[0] == (
                f"{name}:{line}:{column}: error: not valid UTF-8: "
                f"byte 0x{sequence[0]:02x} at offset {offset} ({reason})"
            )

    for offset in insertion_points(len(original)):
        mutant = original[:offset] + b"\0" + original[offset:]
        error = outcome(mutant, name, f"NUL at {offset}")
        assert isinstance(error, ParseError), f"NUL at {offset} was accepted"
        line, column = where(mutant, offset)
        assert str(error).splitlines()[0] == (
            f"{name}:{line}:{column}: error: line contains a NUL byte at offset {offset}"
        )
        assert "\0" not in str(error), "the quoted line must not carry the NUL to the terminal"

    # Truncation at every offset (about 12k parses for the corpus, a second or so), and inside
    # each multibyte character of a non-ASCII tail.
    for size in range(len(original)):
        outcome(original[:size], name, f"truncated to {size} bytes")
    extended = original + MULTIBYTE_TAIL
    assert outcome(extended, name, "with a non-ASCII comment") is None
    text = MULTIBYTE_TAIL.decode()
    offset = len(original)
    for character in text:
        encoded = character.encode()
        for cut in range(1, len(encoded)):
            error = outcome(extended[: offset + cut], name, f"{character!r} cut after {cut}")
            assert isinstance(error, ParseError), f"{character!r} cut after {cut} was accepted"
            assert f"byte 0x{encoded[0]:02x} at offset {offset} (unexpected end of data)" in str(
                error
            )
        offset += len(encoded)

    generator = random.Random(f"flips {path.name}")  # a fixed seed per file
    for flip in range(8):
        mutant = bytearray(original)
        for _ in range(generator.randint(1, 3)):
            mutant[generator.randrange(len(mutant))] = generator.randrange(256)
        outcome(bytes(mutant), name, f"flip {flip}: {bytes(mutant)!r}")


DECODE_CASES = [  # (bytes, expected text or the error's first line and quoted line)
    (b"*filter\nCOMMIT\n", "*filter\nCOMMIT\n", None),
    ("# café\n".encode(), "# café\n", None),
    (b"", "", None),
    (
        b"*filter\n# caf\xe9 (latin-1)\n",
        "f:2:6: error: not valid UTF-8: byte 0xe9 at offset 13 (invalid continuation byte)",
        "# caf\\xe9 (latin-1)",
    ),
    (  # the column counts characters, the offset bytes
        b"# \xc3\xa9\xff\xfe\n",
        "f:1:4: error: not valid UTF-8: byte 0xff at offset 4 (invalid start byte)",
        "# é\\xff\\xfe",
    ),
    (
        b"\xef\xbb",
        "f:1:1: error: not valid UTF-8: byte 0xef at offset 0 (unexpected end of data)",
        "\\xef\\xbb",
    ),
    (b"a\nb\0\xff\n", "f:2:2: error: line contains a NUL byte at offset 3", "b\\x00\\xff"),
    (
        b"a\xff\0",
        "f:1:2: error: not valid UTF-8: byte 0xff at offset 1 (invalid start byte)",
        "a\\xff\\x00",
    ),
]


@pytest.mark.parametrize(("data", "expected", "quoted"), DECODE_CASES)
def test_decode_rules(data: bytes, expected: str, quoted: str | None) -> None:
    if quoted is None:
        assert decode_rules(data, "f") == expected
        return
    with pytest.raises(ParseError) as caught:
        decode_rules(data, "f")
    assert str(caught.value).split("\n") == [expected, quoted]


# The command line, as a user meets it ------------------------------------------------------------

RULES = b"*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
CLI_CASES = [  # (id, the file's bytes, its first stderr line after FILE:, the quoted line)
    (
        "invalid-utf8",
        RULES.replace(b"tcp -m", b"tcp\xff -m"),
        "3:16: error: not valid UTF-8: byte 0xff at offset 41 (invalid start byte)",
        "-A INPUT -p tcp\\xff -m tcp --dport 22 -j ACCEPT",
    ),
    (
        "nul-byte",
        RULES.replace(b"DROP", b"DR\0OP"),
        "2:10: error: line contains a NUL byte at offset 17",
        ":INPUT DR\\x00OP [0:0]",
    ),
    (
        "truncated-character",
        RULES + "# ☃".encode()[:-1],
        "5:3: error: not valid UTF-8: byte 0xe2 at offset 79 (unexpected end of data)",
        "# \\xe2\\x98",
    ),
]


def bpflab(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        encoding="latin-1",  # whatever bytes come back, so a stray one is seen, not a decode error
        timeout=60,
    )


@pytest.mark.parametrize(
    ("data", "first", "quoted"),
    [case[1:] for case in CLI_CASES],
    ids=[case[0] for case in CLI_CASES],
)
def test_check_refuses_a_damaged_file_in_one_sentence(tmp_path, data, first, quoted) -> None:
    path = tmp_path / "damaged.rules"
    path.write_bytes(data)
    assert_one_sentence(bpflab("check", str(path)), str(path), first, quoted)


def test_check_refuses_damaged_stdin_in_one_sentence() -> None:
    _, data, first, quoted = CLI_CASES[0]
    assert_one_sentence(bpflab("check", "-", stdin=data), "<stdin>", first, quoted)


def assert_one_sentence(
    result: subprocess.CompletedProcess[str], name: str, first: str, quoted: str
) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    message, quote, *rest = result.stderr.split("\n")
    assert message == f"{name}:{first}", result.stderr  # one sentence, nothing more on its line
    assert quote == quoted and rest == [""], result.stderr  # the line quoted, then nothing
    assert "\0" not in result.stderr


def test_a_script_whose_rules_file_is_not_text_is_a_script_error(tmp_path) -> None:
    (tmp_path / "damaged.rules").write_bytes(CLI_CASES[0][1])
    script = tmp_path / "s.toml"
    script.write_text(
        'description = "x"\nrules_file = "damaged.rules"\n[[packets]]\nfrom = "client"\n'
        'to = "host"\npacket = "UDP()"\nexpect = "pass"\n'
    )
    with pytest.raises(ScriptError) as caught:
        load_script(script)
    assert str(caught.value) == (
        f"{script}:2: error: {tmp_path / 'damaged.rules'}:3:16: error: not valid UTF-8: "
        "byte 0xff at offset 41 (invalid start byte)"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'description = "x\xff"\n', "1: error: not valid UTF-8: byte 0xff at offset 16"),
        (b'description = "x"\n\n# \x00\n', "3: error: line contains a NUL byte at offset 21"),
    ],
    ids=["invalid-utf8", "nul-byte"],
)
def test_a_script_that_is_not_text_is_a_script_error(tmp_path, data: bytes, message: str) -> None:
    script = tmp_path / "s.toml"
    script.write_bytes(data)
    with pytest.raises(ScriptError) as caught:
        load_script(script)
    assert str(caught.value).startswith(f"{script}:{message}")


def test_a_truncated_rule_is_reported_with_the_commit_it_cut_off(tmp_path) -> None:
    path = tmp_path / "truncated.rules"
    path.write_bytes(RULES[:37])
    result = bpflab("check", str(path))
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.split("\n") == [
        f"{path}:3:10: error: option '-p' requires an argument",
        "-A INPUT -p",
        f"{path}:4:1: error: COMMIT expected at end of input (the *filter table is open)",
        "",
        "",
    ]


def test_check_reports_every_refused_rule_at_once(tmp_path) -> None:
    path = tmp_path / "several.rules"
    path.write_text(
        "*filter\n"
        ":INPUT ACCEPT [0:0]\n"
        "-A INPUT -m nosuchmatch --x 1 -j ACCEPT\n"
        "-A INPUT -p tcp --dport 22 -j ACCEPT\n"
        "-A INPUT -j NOSUCHTARGET\n"
        "-A INPUT -p udp --dport 99999 -j DROP\n"
        "COMMIT\n"
    )
    result = bpflab("check", str(path))
    assert result.returncode == 2 and result.stdout == "", result.stderr
    located = [line.split(": error: ")[0] for line in result.stderr.splitlines()[::2]]
    assert located == [f"{path}:3:10", f"{path}:5:13", f"{path}:6:25"], result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_dump_gives_its_filter_table_and_names_what_it_left_out(tmp_path) -> None:
    path = tmp_path / "dump.rules"
    path.write_text(
        "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -j DNAT --to-destination 1.2.3.4\n"
        "COMMIT\n*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
        "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j MARK --set-mark 1\nCOMMIT\n"
    )
    result = bpflab("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT" in result.stdout
    assert "DNAT" not in result.stdout and "MARK" not in result.stdout
    (note,) = result.stderr.splitlines()
    assert note.startswith("bpflab: note: took the filter table and left out *nat, *mangle: ")
    assert "before nat PREROUTING and mangle" in note
