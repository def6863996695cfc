"""vitoken: Vision Transformers that spend compute only on the tokens that matter."""

__version__ = "0.1.0"
