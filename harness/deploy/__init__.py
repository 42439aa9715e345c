"""The deployed lifecycle: `bpflab apply`, `list`, `save` and `flush` on a namespace's devices,
with the state (pins, rule-set files) that lets separate processes find what was applied."""
