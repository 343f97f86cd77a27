"""Code reward: run the completion against the sample's unit tests in a sandbox (HumanEval format).

Each sample needs a ``test`` column (Python source defining ``check(candidate)``) and an
``entry_point`` column (the function's name). The untrusted program is::

    <code_prefix column, else the prompt> + <code from the completion>

so a completion may continue the prompt's function (HumanEval style) or give a whole function,
fenced or not (chat style; see ``humaneval_solution``).

The rule: the score is 1.0 only when the test's own process confirms that ``check(candidate)``
ran to completion, having called the candidate at least once. Nothing the program does can
produce that confirmation. The reason: a reward counted from the program's exit status (or from
anything it prints) is gamed within hours of RL on real code data: ``sys.exit(0)`` or
``os._exit(0)`` before the tests, a tracer that jumps over the asserts, a patched ``abs`` or
``math.isclose``, a ``check`` of its own, a return value equal to everything. In one interpreter
none of that can be ruled out, since the program can reach and patch whatever the harness uses.

So the program and the tests never share an interpreter (``posttrain.sandbox.run_check``). The
program runs in one sandbox and only answers calls to its entry point with plain data (numbers,
strings, bytes and containers of them, never objects with methods of their own). The prompt
(trusted: its imports and helpers, when it parses alone) and the test run in a second sandbox,
which holds the only pipe a verdict can arrive on. The program's exit status, stdout and stderr
are never read for scoring. Both sandboxes keep their own isolation (namespaces, or seccomp +
Landlock + audit hook).

What this costs: a test whose arguments are not plain data (a function, an object) cannot run
(every completion scores 0 on it), a candidate returning a generator or an object of its own
fails, and the test does not see how the candidate mutated an argument. All 164 HumanEval tasks
fit; their canonical solutions all pass.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from posttrain.plugins import reward
from posttrain.sandbox import CheckResult, Isolation, SandboxLimits, run_check

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


def humaneval_solution(prefix: str, completion: str, entry_point: str) -> str:
    """The untrusted program ``code_exec`` runs for one sample: prefix and completion, no tests.

    A completion that continues the prefix is appended to it. A completion that defines the entry
    point itself keeps the prefix in front (its imports and helpers; the stub gets redefined) when
    the prefix is valid Python on its own, and runs alone otherwise.

    >>> print(humaneval_solution("def inc(x):\\n", "    return x + 1\\n", "inc"))
    def inc(x):
        return x + 1
    <BLANKLINE>
    >>> humaneval_solution("def inc(x):\\n", "```python\\ndef inc(x):\\n    return x + 1\\n```", "inc").startswith("def inc(x):\\n    return")
    True
    """
    code = extract_code(completion)
    if re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return f"{prefix}\n{code}" if _parses(prefix) else code
    return prefix + code


def humaneval_setup(prefix: str) -> str:
    """The trusted code the test's process runs before the test: the prefix when it parses alone
    (a HumanEval prompt: its imports and the helpers its tests call), else nothing."""
    return prefix if _parses(prefix) else ""


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
    jobs: dict[int, tuple[str, str, str, str]] = {}
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if test[i] and entry_point[i]:
            prefix = code_prefix[i] if code_prefix is not None else prompt
            name = str(entry_point[i])
            jobs[i] = (
                humaneval_solution(prefix, completion, name),
                name,
                str(test[i]),
                humaneval_setup(prefix),
            )

    def run(job: tuple[str, str, str, str]) -> CheckResult:
        solution, name, tests, setup = job
        return run_check(solution, name, tests, setup, limits, isolation)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        results = list(ex.map(run, jobs.values()))
    passed = dict(zip(jobs, (1.0 if r.passed else 0.0 for r in results), strict=True))
    return [passed.get(i) for i in range(len(prompts))]
