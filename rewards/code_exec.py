"""Code reward: run the completion against the sample's unit tests in a sandbox (HumanEval format).

Each sample needs a ``test`` column (Python source defining ``check(candidate)``) and an
``entry_point`` column (the function's name). The program that runs is::

    <code_prefix column, else the prompt> + <code from the completion>
    <test>
    check(<entry_point>)

so a completion may continue the prompt's function (HumanEval style) or give a whole function,
fenced or not (chat style; see ``humaneval_program``). The score is 1.0 when the
program exits cleanly. Every program runs in its own ``posttrain.sandbox`` process.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from posttrain.plugins import reward
from posttrain.sandbox import Isolation, SandboxLimits, SandboxResult, run_python

_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of ``completion``, or the completion itself.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("    return 1\\n")
    '    return 1\\n'
    """
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def humaneval_program(prefix: str, completion: str, test: str, entry_point: str) -> str:
    """The program ``code_exec`` runs for one sample.

    A completion that continues the prefix is appended to it. A completion that defines the entry
    point itself keeps the prefix in front (its imports and helpers; the stub gets redefined) when
    the prefix is valid Python on its own, and runs alone otherwise.

    >>> print(humaneval_program("def inc(x):\\n", "    return x + 1\\n", "def check(f):\\n    assert f(1) == 2\\n", "inc"))
    def inc(x):
        return x + 1
    <BLANKLINE>
    <BLANKLINE>
    def check(f):
        assert f(1) == 2
    <BLANKLINE>
    <BLANKLINE>
    check(inc)
    <BLANKLINE>
    >>> humaneval_program("def inc(x):\\n", "```python\\ndef inc(x):\\n    return x + 1\\n```", "", "inc").startswith("def inc(x):\\n    return")
    True
    """
    code = extract_code(completion)
    if re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        program = f"{prefix}\n{code}" if _parses(prefix) else code
    else:
        program = prefix + code
    return f"{program}\n\n{test}\n\ncheck({entry_point})\n"


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


@reward(
    "code_exec",
    doc="1.0 if the completion passes the sample's HumanEval-style `test` (sandboxed)",
    timeout_s=300.0,
)
def code_exec(
    prompts: list[str],
    completions: list[str],
    test: Sequence[str | None],
    entry_point: Sequence[str | None],
    code_prefix: Sequence[str] | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    workers: int = 2,
    isolation: Isolation = "auto",
    **_: object,
) -> list[float | None]:
    """1.0 when the sample's tests pass, 0.0 when they fail; ``None`` where ``test`` is empty.

    >>> code_exec(["def inc(x):\\n"] * 2, ["    return x + 1\\n", "    return x\\n"],
    ...           test=["def check(f):\\n    assert f(1) == 2\\n"] * 2, entry_point=["inc"] * 2)
    [1.0, 0.0]
    """
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb)
    jobs: dict[int, str] = {}
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if test[i] and entry_point[i]:
            prefix = code_prefix[i] if code_prefix is not None else prompt
            jobs[i] = humaneval_program(prefix, completion, str(test[i]), str(entry_point[i]))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        results: list[SandboxResult] = list(
            ex.map(lambda code: run_python(code, limits, isolation=isolation), jobs.values())
        )
    passed = dict(zip(jobs, (1.0 if r.status == "ok" else 0.0 for r in results), strict=True))
    return [passed.get(i) for i in range(len(prompts))]
