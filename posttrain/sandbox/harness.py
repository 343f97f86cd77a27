"""The two halves of ``posttrain.sandbox.run_check``; each runs inside its own sandbox (stdlib only).

``serve`` runs in the *program's* sandbox, next to untrusted code: it runs the solution, then
answers calls to its entry point, one JSON line per call, until the requests end. Everything in
that process, this module included, may be rewritten by the solution; what it sends is only ever
read as plain data.

``check`` runs in the *test's* sandbox, a separate process the program cannot reach: it runs the
trusted setup and test code, hands ``check`` a stand-in for the candidate that forwards each call
to the program, and writes the verdict ``passed N`` to its own pipe only after ``check`` returned
having made N >= 1 calls, every one answered with well-formed plain data.

Plain data: None, bool, int, float, str, bytes, bytearray, complex, and lists, tuples, dicts, sets
and frozensets of plain data. Anything else cannot cross (a candidate that returns it fails).
The wire form tags every container, so a JSON array is always ``[tag, ...]``.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import sys
import types
from collections.abc import Callable
from typing import NoReturn

MAX_LINE_BYTES = 16 << 20  # one request or reply
_SEQUENCES: dict[str, Callable[[list[object]], object]] = {
    "list": list,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
}


def encode(value: object) -> object:
    """``value`` as a JSON-able tree; TypeError for what is not plain data.

    >>> encode({"a": (1, 2.5, None)})
    ['dict', [['a', ['tuple', [1, 2.5, None]]]]]
    """
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if isinstance(value, int):  # IntEnum and other subclasses: their plain value
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytearray):
        return ["bytearray", bytes(value).hex()]
    if isinstance(value, bytes):
        return ["bytes", bytes.hex(value)]
    if isinstance(value, complex):
        return ["complex", value.real, value.imag]
    if isinstance(value, dict):
        return ["dict", [[encode(k), encode(v)] for k, v in value.items()]]
    if isinstance(value, list):
        return ["list", [encode(v) for v in value]]
    if isinstance(value, tuple):
        return ["tuple", [encode(v) for v in value]]
    if isinstance(value, set):
        return ["set", [encode(v) for v in value]]
    if isinstance(value, frozenset):
        return ["frozenset", [encode(v) for v in value]]
    raise TypeError(f"{kind.__name__} is not plain data")


def decode(tree: object) -> object:
    """The value ``encode`` made ``tree`` from; ValueError for anything else.

    Only builds the plain types themselves (never a subclass, never anything callable), so it is
    safe on what an untrusted process sent.

    >>> decode(encode([1, (2, 3), {4}, {"k": b"x"}])) == [1, (2, 3), {4}, {"k": b"x"}]
    True
    """
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if type(tree) is not list or not tree or type(tree[0]) is not str:
        raise ValueError("not plain data")
    tag, rest = tree[0], tree[1:]
    if tag in _SEQUENCES and len(rest) == 1 and type(rest[0]) is list:
        return _SEQUENCES[tag]([decode(v) for v in rest[0]])
    if tag == "dict" and len(rest) == 1 and type(rest[0]) is list:
        out = {}
        for pair in rest[0]:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("not plain data")
            out[decode(pair[0])] = decode(pair[1])
        return out
    if tag in ("bytes", "bytearray") and len(rest) == 1 and type(rest[0]) is str:
        raw = bytes.fromhex(rest[0])
        return raw if tag == "bytes" else bytearray(raw)
    if tag == "complex" and len(rest) == 2:
        real, imag = rest
        if type(real) in (int, float) and type(imag) in (int, float):
            return complex(float(real), float(imag))
    raise ValueError("not plain data")


def _line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _finish(code: int) -> NoReturn:
    """Flush and leave now: no atexit handlers, no waiting for threads the code left behind."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code)


# --------------------------------------------------------------------------------------------------
# the program's side (runs with the untrusted code)


def serve(solution: str, entry_point: str, requests_fd: int, replies_fd: int) -> NoReturn:
    """Run ``solution`` as ``__main__``, then answer calls to ``entry_point`` until the requests end."""
    requests = os.fdopen(requests_fd, "rb", buffering=65536)
    replies = os.fdopen(replies_fd, "wb", buffering=0)
    main = types.ModuleType("__main__")
    main.__file__ = os.path.abspath(solution)
    sys.modules["__main__"] = main
    with open(solution, encoding="utf-8") as f:
        source = f.read()
    exec(compile(source, main.__file__, "exec"), main.__dict__)
    fn = main.__dict__[entry_point]
    while line := requests.readline(MAX_LINE_BYTES + 1):
        _tag, args, kwargs = (decode(tree) for tree in json.loads(line))
        assert isinstance(args, list) and isinstance(kwargs, dict)
        try:
            value = fn(*args, **kwargs)
        except Exception as e:  # SystemExit and friends end the process: the call gets no answer
            try:
                message = str(e)[:2000]
            except Exception:
                message = ""
            reply = _line(["raise", type(e).__name__, message])
        else:
            try:
                reply = _line(["return", encode(value)])
            except (TypeError, ValueError, RecursionError) as e:
                reply = _line(["unplain", str(e)])
        replies.write(reply)
    _finish(0)


# --------------------------------------------------------------------------------------------------
# the test's side (trusted)


class ProtocolError(BaseException):
    """The program did not answer a call with plain data. Not an ``Exception``: tests that catch
    broad exceptions do not swallow it, and the run is marked failed even if one does."""


def check(
    setup: str, test: str, entry_point: str, replies_fd: int, requests_fd: int, verdict_fd: int
) -> NoReturn:
    """Run ``setup`` then ``test`` as ``__main__``, call ``check(candidate)``; write the verdict."""
    requests = os.fdopen(requests_fd, "wb", buffering=0)
    replies = os.fdopen(replies_fd, "rb", buffering=65536)
    exceptions = {
        name: cls
        for name, cls in vars(builtins).items()
        if isinstance(cls, type) and issubclass(cls, Exception)
    }
    main = types.ModuleType("__main__")
    main.__file__ = os.path.abspath(test)
    sys.modules["__main__"] = main
    ns = main.__dict__
    calls = 0
    broken: list[str] = []

    def candidate(*args: object, **kwargs: object) -> object:
        nonlocal calls
        if broken:
            raise ProtocolError(broken[0])
        calls += 1
        try:
            requests.write(_line(["call", encode(list(args)), encode(kwargs)]))
            line = replies.readline(MAX_LINE_BYTES + 1)
            if not line.endswith(b"\n"):
                raise ValueError("the program ended without answering" if not line else "reply too long")
            reply = json.loads(line)
            if type(reply) is list and len(reply) == 2 and reply[0] == "unplain":
                raise ValueError(f"the candidate returned what is not plain data ({str(reply[1])[:200]})")
            if type(reply) is not list or not reply or reply[0] not in ("return", "raise"):
                raise ValueError(f"not an answer: {line[:200]!r}")
            if reply[0] == "return" and len(reply) == 2:
                return decode(reply[1])
            if not (len(reply) == 3 and type(reply[1]) is str and type(reply[2]) is str):
                raise ValueError(f"not an answer: {line[:200]!r}")
        except Exception as e:
            broken.append(f"call {calls}: {e}")
            raise ProtocolError(broken[0]) from None
        found = ns.get(reply[1])  # an exception class of the setup or test (trusted), else a builtin
        cls = found if isinstance(found, type) and issubclass(found, Exception) else exceptions.get(reply[1])
        try:
            error = (cls or Exception)(reply[2])
        except Exception:  # a class that wants other arguments
            error = Exception(f"{reply[1]}: {reply[2]}")
        raise error

    candidate.__name__ = candidate.__qualname__ = entry_point
    for name, path in (("setup", setup), ("test", test)):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        if name == "test":
            ns[entry_point] = candidate
        exec(compile(source, os.path.abspath(path), "exec"), ns)
    ns["check"](candidate)
    if broken or calls == 0:
        print(f"posttrain check: no verdict: {broken[0] if broken else 'check never called the candidate'}")
        _finish(1)
    os.write(verdict_fd, f"passed {calls}\n".encode())
    _finish(0)
