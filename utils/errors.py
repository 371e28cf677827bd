"""Error types raised on both sides of the utils/wan boundary (utils never imports wan)."""


class CheckpointKeyError(ValueError):
    """A checkpoint does not match the model: names the keys and how to proceed."""
