"""Ready-made topologies of namespaces and veth pairs.

Each topology is a context manager: entering builds every namespace, link, address, neighbour
and route; leaving removes the namespaces and with them everything inside. If building fails
halfway, whatever was built is removed before the error propagates.

Every topology lives in namespaces of its own, so all instances use the same fixed address
plan (given in each class's docstring) and can coexist. Interfaces are named eth0 (and eth1
on the router) inside their namespace. The MAC of an interface is 02:00 followed by the bytes
of its IPv4 address (see veth.mac_for).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface
from types import TracebackType
from typing import Self

from netns.namespace import Namespace
from netns.veth import Endpoint, VethEnd, create_veth_pair, prepare_namespace


@dataclass(frozen=True)
class Router:
    """The router of a RouterTopology: one namespace, one interface towards each side."""

    namespace: Namespace
    client_side: Endpoint
    server_side: Endpoint


class Topology:
    """Builds in `__enter__`, removes everything in `__exit__`; subclasses define `_build`.

    With `ipv6` false, interfaces get no IPv6 at all (not even link-local), and every
    Endpoint's `ipv6` is None.
    """

    def __init__(self, *, ipv6: bool = True) -> None:
        self.ipv6 = ipv6
        self._teardown = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self._build(stack)
            # Built completely: keep the namespaces until __exit__.
            self._teardown = stack.pop_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._teardown.close()

    def _build(self, stack: ExitStack) -> None:
        raise NotImplementedError

    def _namespace(self, stack: ExitStack, *, forwarding: bool = False) -> Namespace:
        namespace = stack.enter_context(Namespace())
        prepare_namespace(namespace, ipv6=self.ipv6, forwarding=forwarding)
        return namespace

    def _end(self, namespace: Namespace, ifname: str, ipv4: str, ipv6: str) -> VethEnd:
        return VethEnd(
            namespace=namespace,
            ifname=ifname,
            ipv4=IPv4Interface(ipv4),
            ipv6=IPv6Interface(ipv6) if self.ipv6 else None,
        )


class HostTopology(Topology):
    """A client and a host on one link.

    ```
    client eth0 198.18.0.1/24 fd00::1/64  <-->  host eth0 198.18.0.2/24 fd00::2/64
    ```
    """

    client: Endpoint
    host: Endpoint

    def _build(self, stack: ExitStack) -> None:
        client = self._namespace(stack)
        host = self._namespace(stack)
        self.client, self.host = create_veth_pair(
            self._end(client, "eth0", "198.18.0.1/24", "fd00::1/64"),
            self._end(host, "eth0", "198.18.0.2/24", "fd00::2/64"),
        )


class RouterTopology(Topology):
    """A client and a server on two links, joined by a router that forwards between them.

    ```
    client eth0 198.18.1.1/24   <-->  router eth0 198.18.1.254/24
                fd00:1::1/64                      fd00:1::fe/64
                                      router eth1 198.18.2.254/24  <-->  server eth0 198.18.2.1/24
                                                  fd00:2::fe/64                     fd00:2::1/64
    ```
    The client and the server have default routes via the router's address on their link.
    """

    client: Endpoint
    router: Router
    server: Endpoint

    def _build(self, stack: ExitStack) -> None:
        client = self._namespace(stack)
        router = self._namespace(stack, forwarding=True)
        server = self._namespace(stack)
        self.client, client_side = create_veth_pair(
            self._end(client, "eth0", "198.18.1.1/24", "fd00:1::1/64"),
            self._end(router, "eth0", "198.18.1.254/24", "fd00:1::fe/64"),
        )
        server_side, self.server = create_veth_pair(
            self._end(router, "eth1", "198.18.2.254/24", "fd00:2::fe/64"),
            self._end(server, "eth0", "198.18.2.1/24", "fd00:2::1/64"),
        )
        self.router = Router(namespace=router, client_side=client_side, server_side=server_side)
        _add_default_routes(self.client, via=client_side)
        _add_default_routes(self.server, via=server_side)


def _add_default_routes(endpoint: Endpoint, via: Endpoint) -> None:
    with endpoint.namespace.ipr() as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway=str(via.ipv4.ip), oif=endpoint.ifindex)
        if via.ipv6 is not None:
            ipr.route("add", dst="::/0", gateway=str(via.ipv6.ip), oif=endpoint.ifindex)
