"""The bridge between StackWise runs and PyTorch / safetensors / HF transformers.

    from export import export_run, import_hf

`python -m export.hf --help` is the command line. stackwise_jax never imports this package.
"""


def __getattr__(name):  # lazy, so `python -m export.hf` does not import export.hf twice
    if name == "export_run":
        from export.hf import export_run

        return export_run
    if name == "import_hf":
        from export.importing import import_hf

        return import_hf
    raise AttributeError(name)
