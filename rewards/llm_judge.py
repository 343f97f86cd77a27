"""LLM-as-judge reward: a judge model rates each completion against a rubric.

The judge is any Hugging Face causal-LM checkpoint directory (model + tokenizer with a chat
template), run through posttrain's rollout engine (``posttrain.rollout``: vLLM by default, or
``engine: hf``). Each sample becomes one judge prompt::

    {rubric}
    Question: {prompt}
    Answer: {completion}
    Score 0-{scale}:

(``template`` replaces it), the judge answers greedily, and the first number in its reply,
divided by ``scale``, is the reward. A reply with no number in ``[0, scale]``, or a judge prompt
too long for the judge's context, gives ``None`` for that sample.

In a recipe::

    rewards:
      specs:
        - {name: llm_judge, weight: 0.5, kwargs: {judge: /models/judge, rubric: "Is the answer polite?"}}

The judge engine is loaded once per process (when the reward runner starts) and reused.
"""

from __future__ import annotations

import atexit
import re
import threading
from pathlib import Path
from typing import Any

from posttrain.plugins import reward

DEFAULT_RUBRIC = "Rate how well the answer solves the question."
DEFAULT_TEMPLATE = "{rubric}\nQuestion: {prompt}\nAnswer: {completion}\nScore 0-{scale}:"
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")

_engines: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_engines_lock = threading.Lock()


def parse_score(text: str, scale: float) -> float | None:
    """The first number in the judge's reply divided by ``scale``; ``None`` if absent or out of range.

    >>> parse_score("7", 10)
    0.7
    >>> parse_score(" Score: 8/10, clear and correct", 10)
    0.8
    >>> parse_score("4.5", 5)
    0.9
    >>> parse_score("12", 10) is None, parse_score("-1", 10) is None, parse_score("good", 10) is None
    (True, True, True)
    """
    m = _NUMBER.search(text)
    if m is None:
        return None
    value = float(m.group())
    return value / scale if 0 <= value <= scale else None


def judge_engine(judge: str, engine: str = "vllm") -> tuple[Any, threading.Lock]:
    """The (cached) rollout engine on the judge checkpoint, and the lock that serialises its calls."""
    key = (str(Path(judge).resolve()), engine)
    with _engines_lock:
        if key not in _engines:
            if not Path(judge).is_dir():
                raise FileNotFoundError(
                    f"llm_judge: judge model directory {judge!r} does not exist; "
                    "set the reward's kwargs.judge to a Hugging Face checkpoint directory"
                )
            from posttrain.config import EngineConfig
            from posttrain.models import load_tokenizer
            from posttrain.rollout import make_engine

            tokenizer = load_tokenizer(judge)
            eng = make_engine(
                engine, judge, tokenizer, EngineConfig(kind="vllm" if engine == "vllm" else "hf")
            )
            _engines[key] = (eng, threading.Lock())
        return _engines[key]


def close_judges() -> None:
    """Shut down every judge engine this process started."""
    with _engines_lock:
        for eng, _ in _engines.values():
            eng.close()
        _engines.clear()


atexit.register(close_judges)


def _check(kwargs: dict[str, Any]) -> None:
    """The judge kwargs before the run starts: a checkpoint directory and a known engine."""
    from posttrain.schema import ConfigError

    if "judge" not in kwargs:
        raise ConfigError(
            "reward 'llm_judge' needs kwargs.judge: the path of the judge model's checkpoint directory"
        )
    if not (Path(str(kwargs["judge"])) / "config.json").is_file():
        raise ConfigError(
            f"reward 'llm_judge': kwargs.judge {str(kwargs['judge'])!r} is not a Hugging Face checkpoint directory "
            "(no config.json); point it at a save_pretrained() directory"
        )
    if str(kwargs.get("engine", "vllm")) not in ("vllm", "hf"):
        raise ConfigError(f"reward 'llm_judge': kwargs.engine is {kwargs['engine']!r}; valid: 'vllm', 'hf'")


def _setup(kwargs: dict[str, Any]) -> None:
    _check(kwargs)
    judge_engine(str(kwargs["judge"]), str(kwargs.get("engine", "vllm")))


@reward(
    "llm_judge",
    doc="a judge model (kwargs.judge) rates each completion 0..scale against kwargs.rubric, via the rollout engine",
    timeout_s=600.0,
    check=_check,
    setup=_setup,
)
def llm_judge(
    prompts: list[str],
    completions: list[str],
    judge: str,
    rubric: str = DEFAULT_RUBRIC,
    template: str = DEFAULT_TEMPLATE,
    scale: float = 10.0,
    engine: str = "vllm",
    max_tokens: int = 8,
    **_: object,
) -> list[float | None]:
    """Judge score / ``scale`` per sample (``None`` when the reply has no usable number)."""
    from posttrain.config import SamplingConfig
    from posttrain.types import Sample

    eng, lock = judge_engine(judge, engine)
    samples = [
        Sample(prompt=template.format(rubric=rubric, prompt=p, completion=c, scale=f"{scale:g}"), uid=str(i))
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]
    with lock:
        groups = eng.generate(samples, SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens))
    replies = {g.sample.uid: g.completions[0].text for g in groups}  # overlong prompts have no group
    return [parse_score(replies[s.uid], scale) if s.uid in replies else None for s in samples]
