"""Using a model: top-k predictions, features, folder classification, parity reports, pictures.

- `labels`: ImageNet's class names
- `predict`: `predict`, `features`, `predict_logits` with torchvision's preprocessing
- `classify`: classify files and folders, CSV/JSON results (what `alexnet-jax classify` runs)
- `verify`: torch against JAX on the sample photos (what the converter's `--verify` runs)
- `pictures`: the conv1 filter grid
"""
