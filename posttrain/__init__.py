"""posttrain: the Llama 4 post-training recipe as reusable tooling."""

__version__ = "0.1.0"
