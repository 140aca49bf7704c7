"""Synthetic long-context tasks, generated locally (RULER-style, arXiv 2404.06654).

Every context is real English text (the Python language reference shipped with CPython) of a
given token length with needles planted at spread depths; many questions share one context
and only their last tokens differ, so a server answers them all from one prefill (vLLM's
prefix cache). Per context:

* ``niah_number`` x3, ``niah_word`` x2, ``niah_uuid`` x2: single needles "One of the special
  magic {kind}s for {key} is: {value}." with seven keys in one haystack (RULER's multi-key
  setting: the other keys are the distractors); the question names one key.
* ``niah_multivalue``: one key with three numbers at three depths; all three must be given.
* ``vt`` (variable tracking): ``VAR A = 12345.`` then ``VAR B = VAR A.`` ... a chain of four
  names, beside a distractor chain with another value; every name of the chain must be given.

Scoring: the answer contains the value (all values / all names for the last two).
Deterministic: the same (tokenizer, length, index, seed) gives the same context and questions.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass, field

TASKS = ("niah_number", "niah_word", "niah_uuid", "niah_multivalue", "vt")
_WORDS = ("apple banana cherry dragon eagle falcon garnet harbor island jasmine kettle lantern "
          "meadow nectar orchid pepper quartz raven saffron timber umbrella velvet walnut "
          "yonder zephyr amber breeze canyon dune ember fjord glacier hollow ivory juniper "
          "kelp lagoon marble nutmeg oasis pebble quiver ripple summit thistle tundra violet "
          "willow").split()
_ADJ = ("azure brisk calm dusty eager fierce gentle hollow icy jolly keen lucky mellow noble "
        "odd proud quiet rapid silent tidy urban vivid wild young zany").split()


@dataclass
class Question:
    task: str
    prompt: str  # asked after the context
    answers: list[str]  # every one must appear in the reply

    def correct(self, reply: str) -> bool:
        low = reply.lower()
        return all(a.lower() in low for a in self.answers)


@dataclass
class LongContext:
    tokens: int  # target length of the context in tokens
    index: int
    text: str
    questions: list[Question] = field(default_factory=list)


def filler_text(n_chars: int, offset: int) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    offset %= max(len(text) - n_chars, 1)
    return text[offset:offset + n_chars]


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        k = f"{rng.choice(_ADJ)}-{rng.choice(_WORDS)}"
        if k not in used:
            used.add(k)
            return k


def _var(rng: random.Random, used: set[str]) -> str:
    while True:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in used:
            used.add(v)
            return v


def make_context(tokenizer, tokens: int, index: int, seed: int = 0) -> LongContext:
    """A context of about ``tokens`` tokens (``tokenizer``: a ``tokenizers.Tokenizer``) with
    its needles planted and its nine questions."""
    rng = random.Random(f"{seed}-{tokens}-{index}")
    needles: list[str] = []
    questions: list[Question] = []
    keys: set[str] = set()
    for kind, n in (("number", 3), ("word", 2), ("uuid", 2)):
        for _ in range(n):
            key = _key(rng, keys)
            value = {"number": lambda: str(rng.randint(1_000_000, 9_999_999)),
                     "word": lambda: rng.choice(_WORDS) + rng.choice(_WORDS),
                     "uuid": lambda: str(uuid.UUID(int=rng.getrandbits(128)))}[kind]()
            needles.append(f"One of the special magic {kind}s for {key} is: {value}.")
            questions.append(Question(
                f"niah_{kind}", f"What is the special magic {kind} for {key} mentioned in the "
                f"provided text? Answer with the {kind} only.", [value]))
    groups = [(7, 10), (10, 14), (14, 18)]  # needles [a, b) kept in order
    key = _key(rng, keys)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(3)]
    needles += [f"One of the special magic numbers for {key} is: {v}." for v in values]
    questions.append(Question(
        "niah_multivalue", f"What are all the special magic numbers for {key} mentioned in the "
        "provided text? Answer with the numbers only.", values))
    names: set[str] = set()
    chains = []
    for _ in range(2):  # the asked chain and a distractor
        value = str(rng.randint(10_000, 99_999))
        chain = [_var(rng, names) for _ in range(4)]
        chains.append((value, chain))
        needles += [f"VAR {chain[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
    value, chain = chains[0]
    questions.append(Question(
        "vt", f"Which variables are assigned the value {value}, directly or through other "
        "variables, in the provided text? Answer with the variable names only.", chain))

    # Filler of the right token length; needles after lines at random depths.
    needle_tokens = sum(len(tokenizer.encode(n).ids) + 2 for n in needles)
    chars = filler_text(tokens * 6, offset=rng.randrange(1 << 20))
    ids = tokenizer.encode(chars).ids[: max(tokens - needle_tokens, 0)]
    body = tokenizer.decode(ids)
    lines = body.split("\n")
    depths = [rng.uniform(0.05, 0.95) for _ in needles]
    for a, b in groups:  # a group's statements (multi-value, each chain) stay in order
        depths[a:b] = sorted(depths[a:b])
    slots: dict[int, list[str]] = {}
    for d, n in zip(depths, needles):
        slots.setdefault(int(d * len(lines)), []).append(n)
    out = []
    for li, line in enumerate(lines):
        out.append(line)
        out += slots.get(li, [])
    return LongContext(tokens, index, "\n".join(out), questions)


def chat_messages(ctx: LongContext, q: Question) -> list[dict]:
    """One chat turn: the shared context first, the question last (prefix-cache friendly)."""
    return [{"role": "user", "content": f"{ctx.text}\n\n{q.prompt}"}]
