"""Stand-in for the three torchvision imports of diffusers' ``examples/cogvideo/train_cogvideox_lora.py`` (see
``benchmarks/diffusers_lora/README.md``): PyPI's torchvision does not import beside this project's torch."""
