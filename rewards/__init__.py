"""Built-in reward plugins. Importing this package registers them.

Optional dependencies are imported when a reward runs, never here: ``import rewards`` works
without math-verify, and ``math_verify`` then fails with the extra to install.
"""

from rewards import code_exec, exact_match, format, length_penalty, llm_judge, math_reward  # noqa: F401
