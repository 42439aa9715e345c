"""Our numbers for the kernel's enumerations, checked against the running kernel's BTF."""

from __future__ import annotations

import pytest

from codegen.bpf import btf
from codegen.bpf.isa import HELPERS, AttachType, FibResult, MapType, ProgType

pytestmark = pytest.mark.privileged


def test_helper_ids_match_kernel():
    kernel = btf.vmlinux().enum("bpf_func_id")
    for number, name in enumerate(HELPERS):
        if name == "unspec":
            continue
        assert kernel[f"BPF_FUNC_{name}"] == number, name


@pytest.mark.parametrize(
    ("enum", "prefix", "ours"),
    [
        ("bpf_map_type", "BPF_MAP_TYPE_", MapType),
        ("bpf_prog_type", "BPF_PROG_TYPE_", ProgType),
        ("bpf_attach_type", "BPF_", AttachType),
    ],
)
def test_enumerations_match_kernel(enum, prefix, ours):
    kernel = btf.vmlinux().enum(enum)
    for member in ours:
        assert kernel[prefix + member.name] == member.value


def test_fib_results_match_kernel():
    # The result codes are an anonymous enum in the UAPI: found by one of its members.
    kernel = btf.vmlinux().enum("BPF_FIB_LKUP_RET_SUCCESS")
    for member in FibResult:
        assert kernel[f"BPF_FIB_LKUP_RET_{member.name}"] == member.value


def test_unknown_kfunc_is_a_clear_error():
    with pytest.raises(btf.BtfError, match="kernel function 'no_such_kfunc' is not in the kernel"):
        btf.vmlinux().function_id("no_such_kfunc")
