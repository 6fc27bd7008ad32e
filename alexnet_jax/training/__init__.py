"""The training run around the pure steps: config, input pipeline, loop, checkpoints, workdir, signals.

- `config`: `TrainConfig`, every check of it, the defaults each architecture gives
- `recipe`: torchvision's recipe and the paper's (`Plateau`)
- `run`: a `TrainConfig` resolved once: `Arch`, model, optimizer, device layout, data (`resolve_run`)
- `sources`: where images come from: an ImageFolder tree or `pack`'s ArrayRecord shards (`open_data`)
- `pipeline`: uint8 batches of each architecture's transforms in Grain workers, exact resume
- `pack`: an ImageFolder written once into ArrayRecord shards
- `loop`: `train_and_evaluate`
- `checkpoint`: Orbax checkpoints that survive kills, full disks and damage
- `metrics`: metrics.jsonl and curves.png
- `workdir`: one run per workdir (the lock), finished results kept
- `shutdown`: SIGTERM/SIGINT as a stop request; data workers that end with their parent

Needs the `train` extra (Orbax, Grain with ArrayRecord, matplotlib).
"""
