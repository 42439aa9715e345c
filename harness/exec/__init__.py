"""`bpflab exec`: an unmodified iptables binary's filter-table calls answered by bpflab
(harness.exec.supervisor says how and why)."""
