"""Models out of JAX: AlexNet as a `jax.export` artifact (StableHLO) or an ONNX model, for serving elsewhere.

- `stablehlo`: the classifier, the trunk or LPIPS as a serialized `jax.export` artifact, symbolic batch and size
- `onnx_graph`: the classifier or the trunk as an ONNX model (the `export` extra), dynamic batch and size
- `artifact`: either format to a file in one call (`export_file`), what `alexnet-jax export` runs

Above `lpips` (LPIPS exports too), below `cli` (`alexnet-jax export`). See docs/export.md.
"""
