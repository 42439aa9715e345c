"""Throwaway network namespaces, veth pairs and topologies for testing TC programs."""

from netns.namespace import CommandError, Namespace, NamespaceError
from netns.reaper import reap
from netns.topology import HostTopology, Router, RouterTopology, Topology
from netns.veth import Endpoint, VethEnd, create_veth_pair, prepare_namespace

__all__ = [
    "CommandError",
    "Endpoint",
    "HostTopology",
    "Namespace",
    "NamespaceError",
    "Router",
    "RouterTopology",
    "Topology",
    "VethEnd",
    "create_veth_pair",
    "prepare_namespace",
    "reap",
]
