"""An example reward plugin: the share of letters in the completion that are capitals."""


def shout(prompts: list[str], completions: list[str], **columns: object) -> list[float | None]:
    """Share of the completion's letters that are upper case; None when it has no letters.

    >>> shout(["q", "q", "q"], ["HELLO", "Hi", "42"])
    [1.0, 0.5, None]
    """
    out: list[float | None] = []
    for text in completions:
        letters = [ch for ch in text if ch.isalpha()]
        out.append(sum(ch.isupper() for ch in letters) / len(letters) if letters else None)
    return out
