"""easel: Stable Diffusion you can run, train from scratch and see inside."""
__version__ = "0.1.0"


def load(path_or_id=None, dtype: str = "fp32", device: str = "cpu", **kwargs):
    """Load a model (file, diffusers folder, hub id; None = built-in) and return a Pipeline."""
    from easel.pipelines.pipeline import load as _load
    return _load(path_or_id, dtype=dtype, device=device, **kwargs)
