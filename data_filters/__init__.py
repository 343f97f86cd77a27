"""Built-in dataset filters (difficulty judges and others). Importing this package registers them."""
