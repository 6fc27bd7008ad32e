"""Images in, arrays out: reading image files, torchvision's preprocessing, and training augmentation.

- `images`: reading an image file, walking folders of them (one walker for every use)
- `preprocess`: torchvision's IMAGENET1K_V1 eval transform, bit for bit, in numpy
- `augment`: the training transforms of both architectures, ten crops, PCA colour noise

Depends on nothing else in the package.
"""
