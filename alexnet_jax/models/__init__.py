"""The networks: torchvision's AlexNet and the 2012 paper's, in Flax linen and NNX.

- `layers`: the convolution (XLA or Winograd), max-pool and adaptive pool both networks share
- `winograd`: Winograd convolutions (opt-in, for CPUs)
- `alexnet`: torchvision's AlexNet (`AlexNet`, `trunk_features`, `replace_head`)
- `alexnet2012`: the paper's network (`AlexNet2012`: LRN, grouped convolutions)
- `trees`: `{"params": ...}` or a bare params tree, accepted alike everywhere
- `variables`: the parameter layouts of both, and the checks that tell them apart
- `nnx`: both networks as Flax NNX modules

Depends on nothing else in the package.
"""
