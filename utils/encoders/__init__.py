"""Encoders around the Wan VAE, UMT5 and CLIP: loaders, whole-clip VAE forward, prompt cache, tiny configs."""
