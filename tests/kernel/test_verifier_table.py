"""The kernel verifier as judge, in the style of the kernel's test_verifier: each case is a
program, the expected verdict and, for rejections, a substring of the verifier's complaint."""

from __future__ import annotations

import pytest

from codegen.bpf import insn as I
from codegen.bpf.asm import Label, Subprogram
from codegen.bpf.isa import R0, R1, R2, R3, R6, R10, AluOp, JmpOp, MapType, Size
from codegen.bpf.loader import VerifierError, load
from codegen.bpf.maps import Map

pytestmark = pytest.mark.privileged

ACCEPT, REJECT = "accept", "reject"

# Reading the packet: data at ctx+76, data_end at ctx+80 (struct __sk_buff).
BOUNDED_READ = [
    I.ldx(Size.W, R2, R1, 76),
    I.ldx(Size.W, R3, R1, 80),
    I.mov64(R1, R2),
    I.alu64(AluOp.ADD, R1, 14),
    I.jmp(JmpOp.JGT, R1, R3, "out"),
    I.ldx(Size.H, R0, R2, 12),
    Label("out"),
    I.mov64(R0, 0),
    I.exit_(),
]

CASES = [
    ("return 0", [I.mov64(R0, 0), I.exit_()], ACCEPT, None),
    ("r0 never set", [I.exit_()], REJECT, "R0 !read_ok"),
    ("uninitialised register", [I.mov64(R0, R2), I.exit_()], REJECT, "R2 !read_ok"),
    (
        "write to frame pointer",
        [I.mov64(R10, 0), I.mov64(R0, 0), I.exit_()],
        REJECT,
        "frame pointer is read only",
    ),
    ("bounded packet read", BOUNDED_READ, ACCEPT, None),
    (
        "unbounded packet read",
        [I.ldx(Size.W, R2, R1, 76), I.ldx(Size.H, R0, R2, 12), I.mov64(R0, 0), I.exit_()],
        REJECT,
        "invalid access to packet",
    ),
    # Programs loaded with CAP_BPF may read stack they never wrote (env->allow_uninit_stack).
    ("stack read before write", [I.ldx(Size.DW, R0, R10, -8), I.exit_()], ACCEPT, None),
    (
        "stack out of bounds",
        [I.st(Size.DW, R10, -520, 0), I.mov64(R0, 0), I.exit_()],
        REJECT,
        "invalid write to stack",
    ),
    ("infinite loop", [Label("top"), I.ja("top")], REJECT, "infinite loop"),
    ("fall off the end", [I.mov64(R0, 0)], REJECT, "last insn is not an exit or jmp"),
    ("unknown helper", [I.call(9999), I.exit_()], REJECT, "invalid func"),
    ("helper with bad args", [I.call("map_lookup_elem"), I.exit_()], REJECT, "R1 type=ctx"),
    (
        "ctx write to len",
        [I.st(Size.W, R1, 0, 1), I.mov64(R0, 0), I.exit_()],
        REJECT,
        "invalid bpf_context access",
    ),
    ("ctx write to mark", [I.st(Size.W, R1, 8, 1), I.mov64(R0, 0), I.exit_()], ACCEPT, None),
    (
        "bpf-to-bpf call",
        [I.call_local("f"), I.exit_(), Subprogram("f"), I.mov64(R0, 1), I.exit_()],
        ACCEPT,
        None,
    ),
    (
        "subprogram reads caller's r6",
        [I.mov64(R6, 1), I.call_local("f"), I.exit_(), Subprogram("f"), I.mov64(R0, R6), I.exit_()],
        REJECT,
        "R6 !read_ok",
    ),
    (
        "division by register (checked at run time)",
        [I.mov64(R0, 10), I.mov64(R1, 0), I.alu64(AluOp.DIV, R0, R1), I.exit_()],
        ACCEPT,
        None,
    ),
    (
        "map lookup result used without null check",
        [
            I.st(Size.W, R10, -4, 0),
            I.ld_map_fd(R1, "hash"),
            I.mov64(R2, R10),
            I.alu64(AluOp.ADD, R2, -4),
            I.call("map_lookup_elem"),
            I.ldx(Size.DW, R0, R0, 0),
            I.exit_(),
        ],
        REJECT,
        "invalid mem access 'map_value_or_null'",
    ),
    (
        "map lookup with null check",
        [
            I.st(Size.W, R10, -4, 0),
            I.ld_map_fd(R1, "array"),
            I.mov64(R2, R10),
            I.alu64(AluOp.ADD, R2, -4),
            I.call("map_lookup_elem"),
            I.jmp(JmpOp.JEQ, R0, 0, "out"),
            I.ldx(Size.DW, R0, R0, 0),
            Label("out"),
            I.mov64(R0, 0),
            I.exit_(),
        ],
        ACCEPT,
        None,
    ),
]


@pytest.fixture(scope="module")
def maps():
    # Lookups in an array with a constant in-range key are known non-null on recent kernels;
    # a hash map lookup may always fail.
    with (
        Map(MapType.ARRAY, 4, 8, 1, name="vt_array") as array,
        Map(MapType.HASH, 4, 8, 16, name="vt_hash") as table,
    ):
        yield {"array": array, "hash": table}


@pytest.mark.parametrize(
    ("name", "program", "verdict", "message"), CASES, ids=[case[0] for case in CASES]
)
def test_verifier(name, program, verdict, message, maps):
    annotated = [
        item.annotate(f"case {name!r} instruction {index}") if isinstance(item, I.Insn) else item
        for index, item in enumerate(program)
    ]
    if verdict == ACCEPT:
        with load(annotated, name="vt", maps=maps) as loaded:
            assert loaded.fd >= 0
            assert loaded.stats is not None and loaded.stats.insns_processed > 0
        return
    with pytest.raises(VerifierError) as caught:
        load(annotated, name="vt", maps=maps)
    error = caught.value
    assert message in error.log
    assert message in str(error) or "last insn" in str(error)
    if error.slot is not None and error.insn is not None:
        # The failing instruction is traced back to where it came from.
        assert error.annotation is not None
        assert f"case {name!r}" in str(error)


def test_rejection_names_the_annotated_instruction():
    program = [
        I.mov64(R0, 0).annotate("-A INPUT -p udp -j ACCEPT"),
        I.ldx(Size.W, R0, R2, 0).annotate("-A INPUT -p tcp -j DROP"),
        I.exit_(),
    ]
    with pytest.raises(VerifierError) as caught:
        load(program, name="vt")
    assert caught.value.slot == 1
    assert caught.value.annotation == "-A INPUT -p tcp -j DROP"
    assert "-A INPUT -p tcp -j DROP" in str(caught.value)
    assert "R2 !read_ok" in str(caught.value)


def test_slots_count_ld_imm64_twice():
    program = [
        I.ld_imm64(R1, 1),
        I.mov64(R0, 0),
        I.ldx(Size.W, R0, R3, 0).annotate("here"),
        I.exit_(),
    ]
    with pytest.raises(VerifierError) as caught:
        load(program, name="vt")
    assert caught.value.slot == 3
    assert caught.value.annotation == "here"


def test_log_buffer_grows_until_the_whole_log_fits(monkeypatch):
    from codegen.bpf import loader

    program = [I.mov64(R0, 0), *[I.alu64(AluOp.ADD, R0, 1)] * 200, I.mov64(R0, R2), I.exit_()]
    monkeypatch.setattr(loader, "FAILURE_LOG_SIZE", 64)
    with pytest.raises(VerifierError) as caught:
        load(program, name="vt")
    assert caught.value.log.startswith("func#0") or caught.value.log.startswith("0:")
    assert "R2 !read_ok" in caught.value.log
    assert caught.value.slot == 201
    assert len(caught.value.log) > 64 * 20
