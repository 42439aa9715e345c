"""Which program goes on which device, and the swap of all of them: every device but a bridge
port gets the routed pair (`ingress`: INPUT and FORWARD, `egress`: OUTPUT); a bridge port,
which is no IP device of its own, gets the port pair (`port_ingress`: the frame's stamp,
`bridged`: FORWARD of bridged packets; codegen.tc.bridges). One tcx link per device and
direction, pinned as `link_DEVICE_DIRECTION`; a re-apply swaps the program of each link in
place (atomic per link) and, if any step fails, puts back what each link ran."""

from __future__ import annotations

from pathlib import Path

from codegen.bpf.info import linked_program
from codegen.bpf.links import TcAttachment, attach_tc
from codegen.bpf.maps import get_pinned, pin
from codegen.bpf.syscall import BpfError, close
from netns.namespace import Namespace

from ..backends import Program
from .state import fault

ROUTED = ("ingress", "egress")
PORT = ("port_ingress", "bridged")
HOOKS = (*ROUTED, *PORT)


def roles(targets: dict[str, int], ports: dict[int, int]) -> dict[str, tuple[str, str]]:
    """The (ingress, egress) hooks of each target device."""
    return {device: PORT if index in ports else ROUTED for device, index in targets.items()}


def attach_all(
    namespace: Namespace,
    pins: Path,
    targets: dict[str, int],
    hooks: dict[str, tuple[str, str]],
    programs: dict[str, Program],
) -> None:
    """Attach or swap every device's two programs; on any failure, undo what was done."""
    done: list[tuple[TcAttachment, int | None, Path]] = []  # attachment, old program, pin
    try:
        with namespace.enter():
            for device, ifindex in sorted(targets.items()):
                for direction, hook in zip(("ingress", "egress"), hooks[device], strict=True):
                    program = programs[hook]
                    link_pin = pins / f"link_{device}_{direction}"
                    if link_pin.exists():
                        link = TcAttachment(ifindex, direction, "tcx", get_pinned(str(link_pin)))
                        old = linked_program(link.link_fd)
                        done.append((link, old, link_pin))
                        link.replace(program.fd, program.name)
                    else:
                        link = attach_tc(program.fd, ifindex, direction, mode="tcx")
                        pins.mkdir(parents=True, exist_ok=True)
                        done.append((link, None, link_pin))
                        pin(link.link_fd, str(link_pin))
                    if direction == "ingress":
                        fault("between-hooks")
    except BaseException:
        for link, old, link_pin in reversed(done):
            try:
                if old is None:
                    link.detach()
                    link_pin.unlink(missing_ok=True)
                else:
                    link.replace(old)
            except BpfError:
                pass
        raise
    finally:
        for link, old, _ in done:
            link.close()
            if old is not None:
                close(old)
