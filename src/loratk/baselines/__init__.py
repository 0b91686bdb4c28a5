"""GAN baselines on the same data and metrics as the adapters: DCGAN and WGAN-GP, with Diffusion-GAN's
diffusion augmentation, trained by a small loop of their own (`baselines.loop`)."""
