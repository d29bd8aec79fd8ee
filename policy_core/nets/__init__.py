"""The networks of Diffusion Policy in MLX: the denoiser (``unet``) and the image encoder (``vision``)."""
