"""easel: Stable Diffusion you can run, train from scratch and see inside."""
__version__ = "0.1.0"


def load(path_or_id=None, dtype: str = "fp32", device: str = "cpu", compile: bool = False, **kwargs):
    """Load a model (file, diffusers folder, hub id; None = built-in) and return a Pipeline; `compile=True` runs
    its UNet through torch.compile, the compiled code cached on disk (easel.pipelines.compile)."""
    from easel.pipelines.pipeline import load as _load
    pipe = _load(path_or_id, dtype=dtype, device=device, **kwargs)
    if compile:
        from easel.pipelines.compile import compile_pipeline
        compile_pipeline(pipe)
    return pipe
