"""The multi-process runtime (`runtime.name=dist`): every component in its own process.

Beside the simulator (sim/), it runs the same rules (methods/): a coordinator (coordinator.py)
starts one worker process per component (worker.py); processes talk over one 2-rank gloo group
per link (transport.py, wire.py), built from the coordinator's TCPStore. `runtime.mode=lockstep`
(lockstep.py) makes each node wait for exactly what the simulator's schedule prescribes, so a run
equals the simulated one step for step (tests/test_dist.py checks it against the goldens);
`runtime.mode=free` (free.py) waits only for what the method needs and measures the staleness.
"""
