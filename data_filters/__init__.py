"""Built-in data filters (difficulty judges and baselines). Importing this package registers them.

``pass_rate`` (a judge model's failure rate, verified by a reward), ``llm_rating`` (a judge LLM's expected
difficulty rating), ``completion_length`` (model-free) and ``random`` (the baseline). See
docs/data_filters.md.
"""

from data_filters import completion_length, llm_rating, pass_rate, random_baseline

__all__ = ["completion_length", "llm_rating", "pass_rate", "random_baseline"]
