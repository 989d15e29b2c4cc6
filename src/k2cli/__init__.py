"""k2: the Kimi K2 training recipe, end to end, at a scale one machine can afford."""

__version__ = "0.1.0"


def load_model(ref, device="cpu"):
    """Load a model artifact (path, 'stage:vN' or 'stage:latest') for use in a notebook.

    >>> model = k2cli.load_model("pretrain:latest")
    >>> logits = model(input_ids)          # [B, T, V]
    """
    from k2cli.model.io import load_model as _load

    return _load(ref, device=device)[0]
