"""Many devices and many processes: data parallelism, the paper's two towers, and lost peers.

- `parallel`: `pmap` and `jit` with `NamedSharding`, `jax.distributed` start-up, values across processes
- `towers`: the 2012 network's two-tower layout over a ("data", "model") mesh
- `peers`: heartbeats that end every process of a run when one is lost; process 0's coordinator child
- `coordinator_service`: that child, run as a script (imports jaxlib's extension alone)
"""
