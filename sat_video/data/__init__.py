"""Data: where samples come from, how clips are cut, the order ranks draw batches in, the latent cache, video I/O."""
