"""A character-level tokenizer for the tiny world, built locally as a real HF fast tokenizer.

Every printable ASCII character is one token; chat roles are single special tokens. The result is a
``PreTrainedTokenizerFast`` with a chat template, so ``save_pretrained`` writes a ``tokenizer.json``
that transformers and vLLM load as they load any other tokenizer.

    >>> tok = build_char_tokenizer()
    >>> tok.decode(tok.encode("12+34=", add_special_tokens=False))
    '12+34='
    >>> tok.apply_chat_template([{"role": "user", "content": "1+1="}], tokenize=False, add_generation_prompt=True)
    '<bos><|user|>1+1=<|end|><|assistant|>'
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# The assistant turn ends with <eos>, so generation stops there and the completion is the answer alone.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    chars = [
        c for c in string.printable if c not in "\x0b\x0c\r"
    ]  # digits, letters, punctuation, space, \t, \n
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
