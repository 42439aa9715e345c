"""The packet lab: packet scripts and their replay in namespace topologies, the traffic they
send and watch, and the netfilter oracle and twin labs where iptables-legacy decides."""
