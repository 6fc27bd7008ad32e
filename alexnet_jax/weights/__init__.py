"""Weights in and out: torchvision's state_dicts <-> Flax variables, files, and ready models.

- `convert`: the name table between torchvision's state_dict and Flax's params, both directions
- `torchvision`: the IMAGENET1K_V1 record, its hash-checked download, safe `.pth`/`.safetensors` reading
- `torch_file`: torch.save's zip format read without torch (a weights-only unpickler of its own)
- `serialization`: variables files (msgpack or safetensors), checked and written atomically
- `pretrained`: `load_model`, weights from any source to a ready model
- `reference`: the torch references (torchvision's class, or a verbatim copy; the 2012 network)

The only part of the package that uses torch (the `convert` extra), and only when called: for
`--verify`'s reference and legacy-format files; `.pth` files in torch's zip format need no torch.
"""
