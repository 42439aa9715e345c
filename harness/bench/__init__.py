"""`bpflab bench`: per-packet cost, throughput and load time against the rule count (`run`)."""
