"""routerd: a local daemon that routes LLM API calls for every agent process on a machine."""

__version__ = "0.1.0"

__all__ = ["__version__"]
