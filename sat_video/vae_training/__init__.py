"""Training and fine-tuning the 3D causal VAE (``tools/train_vae.py``): its losses, discriminator and loop."""
