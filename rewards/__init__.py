"""Built-in reward plugins. Importing this package registers them."""

from rewards import exact_match  # noqa: F401
