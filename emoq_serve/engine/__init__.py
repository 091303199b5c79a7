"""Scheduling between the server and an engine: what runs when, and what happens when it breaks.

Modules: `batcher` (DynamicBatcher: max batch, max queue delay, length buckets, bounded queue),
`supervisor` (EngineSupervisor: a watchdog that rebuilds a broken engine while health says
NOT_SERVING), `cluster` (the engine as Ray Serve replicas behind this process's front door).
Nothing here speaks gRPC or runs a model itself.
"""
