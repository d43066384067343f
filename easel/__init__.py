"""easel: Stable Diffusion you can run, train from scratch and see inside."""
__version__ = "0.1.0"
