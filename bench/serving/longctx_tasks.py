"""Synthetic long-context tasks, generated locally (RULER-style, arXiv 2404.06654).

Every context is real English text (the Python language reference shipped with CPython) of a
given token length with needles planted at random depths; many questions share one context
and only their last tokens differ, so a server answers them all from one prefill (vLLM's
prefix cache). Per context, nine needles, each a different statement, and one question each:

* ``niah_number`` x4: "The access code for the north gate is 4821937." (seven digits)
* ``niah_word`` x2: "The name of the lighthouse keeper's cat is Juniper."
* ``niah_uuid`` x2: "The license key for the mapping software is <UUID>."
* ``passkey`` x1: "The pass key is 58213. Remember it. 58213 is the pass key." (Landmark
  Attention's passkey, arXiv 2305.16300)

The needles' subjects are all different (RULER's multi-key setting, the other needles being
the distractors): a first suite that used one template for seven keys, a multi-value key and
variable tracking was too hard for the 0.5B model even with exact attention (56% at 8k, 11%
on a 16k context; docs/results/longctx_qwen_first_suite.md), so those tasks were dropped.

Scoring: the reply contains the value. Deterministic: the same (tokenizer, length, index,
seed) gives the same context and questions.

Two more suites share the scoring and the prefix cache: ``make_code_context`` (a long Python
file, complete a call to a function defined far back) and ``make_words_context`` (common-word
extraction: which of five words occurs most often in a long numbered word list).
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("niah_number", "niah_word", "niah_uuid", "passkey")
_WORDS = ("Apple Banana Cherry Dragon Eagle Falcon Garnet Harbor Island Jasmine Kettle Lantern "
          "Meadow Nectar Orchid Pepper Quartz Raven Saffron Timber Umbrella Velvet Walnut "
          "Yonder Zephyr Amber Breeze Canyon Dune Ember Fjord Glacier Hollow Ivory Juniper "
          "Kelp Lagoon Marble Nutmeg Oasis Pebble Quiver Ripple Summit Thistle Tundra Violet "
          "Willow").split()
# (statement with {v}, question): every subject different, so no needle answers another's
_NUMBERS = [
    ("The access code for the north gate is {v}.", "What is the access code for the north gate?"),
    ("Dr. Okafor's office phone extension is {v}.", "What is Dr. Okafor's office phone extension?"),
    ("The tracking number of the parcel sent to Lisbon is {v}.",
     "What is the tracking number of the parcel sent to Lisbon?"),
    ("The combination of the safe in the captain's cabin is {v}.",
     "What is the combination of the safe in the captain's cabin?"),
    ("The serial number stamped on the brass telescope is {v}.",
     "What is the serial number stamped on the brass telescope?"),
    ("The invoice number for the harbor repairs is {v}.",
     "What is the invoice number for the harbor repairs?"),
]
_WORD_NEEDLES = [
    ("The name of the lighthouse keeper's cat is {v}.",
     "What is the name of the lighthouse keeper's cat?"),
    ("The codeword for the midnight meeting is {v}.", "What is the codeword for the midnight meeting?"),
    ("The ship that left the harbor at dawn was called the {v}.",
     "What was the ship that left the harbor at dawn called?"),
    ("The secret ingredient in grandmother's soup is {v}.",
     "What is the secret ingredient in grandmother's soup?"),
]
_UUIDS = [
    ("The license key for the mapping software is {v}.",
     "What is the license key for the mapping software?"),
    ("The identifier of the missing shipment is {v}.",
     "What is the identifier of the missing shipment?"),
]


@dataclass
class Question:
    task: str
    prompt: str  # asked after the context
    answers: list[str]  # every one must appear in the reply
    wrong: list[str] = field(default_factory=list)  # none may appear (a choice's other options)

    def correct(self, reply: str) -> bool:
        low = reply.lower()
        return (all(a.lower() in low for a in self.answers)
                and not any(re.search(rf"\b{re.escape(w.lower())}\b", low) for w in self.wrong))


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


def make_context(tokenizer, tokens: int, index: int, seed: int = 0) -> LongContext:
    """A context of about ``tokens`` tokens (``tokenizer``: a ``tokenizers.Tokenizer``) with
    its nine needles planted and their questions."""
    rng = random.Random(f"{seed}-{tokens}-{index}")
    picks = ([("niah_number", t, str(rng.randint(1_000_000, 9_999_999)))
              for t in rng.sample(_NUMBERS, 4)]
             + [("niah_word", t, rng.choice(_WORDS)) for t in rng.sample(_WORD_NEEDLES, 2)]
             + [("niah_uuid", t, str(uuid.UUID(int=rng.getrandbits(128)))) for t in _UUIDS])
    key = str(rng.randint(10_000, 99_999))
    picks.append(("passkey", (f"The pass key is {key}. Remember it. {key} is the pass key.",
                              "What is the pass key?"), key))
    needles = [stmt.format(v=v) for _, (stmt, _), v in picks]
    questions = [Question(task, f"{q} Answer with the {_KIND[task]} only.", [v])
                 for task, (_, q), v in picks]
    # Filler of the right token length; needles after lines at random depths.
    needle_tokens = sum(len(tokenizer.encode(n).ids) + 2 for n in needles)
    chars = filler_text(tokens * 6, offset=rng.randrange(1 << 20))
    ids = tokenizer.encode(chars).ids[: max(tokens - needle_tokens, 0)]
    lines = tokenizer.decode(ids).split("\n")
    slots: dict[int, list[str]] = {}
    for n in needles:
        slots.setdefault(int(rng.uniform(0.05, 0.95) * len(lines)), []).append(n)
    out = []
    for li, line in enumerate(lines):
        out.append(line)
        out += slots.get(li, [])
    return LongContext(tokens, index, "\n".join(out), questions)


_KIND = {"niah_number": "number", "niah_word": "word", "niah_uuid": "key", "passkey": "number"}

# ----------------------------------------------------------------------------- code task

CODE_TASKS = ("code_call",)
_VERBS = ("reconcile", "summarize", "normalize", "dispatch", "archive", "validate", "project",
          "allocate", "throttle", "estimate", "rebalance", "quarantine")
_NOUNS = ("ledger", "telemetry", "invoice", "manifest", "beacon", "roster", "tariff",
          "harvest", "voyage", "glacier", "orchard", "pipeline", "quarry", "lantern")
_PARAMS = ("cutoff_day", "strict_mode", "max_retries", "region_code", "batch_label",
           "decay_rate", "owner_email", "grace_period", "shard_count", "unit_price",
           "dry_run", "source_path", "target_path", "timeout_s", "priority_level",
           "currency", "min_score", "tag_prefix")


def python_source(n_chars: int, offset: int) -> str:
    """Real Python code: the standard library's top-level modules of this interpreter,
    concatenated in name order (each under a ``# file:`` line), from ``offset``."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    start = offset % len(files)
    parts: list[str] = []
    total = 0
    for f in files[start:] + files[:start]:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(f"# file: {f.name}\n{text}")
        total += len(parts[-1])
        if total >= n_chars:
            break
    return "\n".join(parts)[:n_chars]


def make_code_context(tokenizer, tokens: int, index: int, seed: int = 0,
                      functions: int = 9) -> LongContext:
    """A long Python file of about ``tokens`` tokens (the standard library's modules) with
    ``functions`` functions of unique names planted at top-level boundaries at random depths,
    and one question each: complete a call to it, passing every parameter by keyword (the
    long-file code task: the parameters are only in the definition, far back). Correct when
    the reply names every parameter."""
    rng = random.Random(f"code-{seed}-{tokens}-{index}")
    names = rng.sample([f"{v}_{n}" for v in _VERBS for n in _NOUNS], functions)
    defs, questions = [], []
    for name in names:
        params = rng.sample(_PARAMS, 3)
        verb, noun = name.split("_", 1)
        defs.append(f"def {name}({', '.join(params)}):\n"
                    f"    \"\"\"{verb.capitalize()} the {noun} records.\"\"\"\n"
                    f"    return _{verb}({', '.join(params)})\n")
        questions.append(Question(
            "code_call", "Complete this call to the function defined in the file above, "
            "passing every one of its parameters by keyword. Reply with the call only.\n"
            f"result = {name}(", params))
    def_tokens = sum(len(tokenizer.encode(d).ids) + 2 for d in defs)
    chars = python_source(tokens * 5, offset=rng.randrange(1 << 20))
    ids = tokenizer.encode(chars).ids[: max(tokens - def_tokens, 0)]
    lines = tokenizer.decode(ids).split("\n")
    tops = [i for i, line in enumerate(lines) if line.startswith(("def ", "class "))] or [0]
    slots: dict[int, list[str]] = {}
    for d in defs:
        depth = rng.uniform(0.05, 0.9)
        at = min(tops, key=lambda i: abs(i - depth * len(lines)))  # before a top-level def
        slots.setdefault(at, []).append(d)
    out = []
    for li, line in enumerate(lines):
        out += slots.get(li, [])
        out.append(line)
    return LongContext(tokens, index, "\n".join(out), questions)


# ------------------------------------------------------------------ common-word extraction

WORDS_TASKS = ("common_word",)


def word_pool() -> list[str]:
    """Distinct lowercase English words of 4-10 letters from the Python language reference
    (shipped with CPython), sorted: the vocabulary of the word lists."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    return sorted({w for w in re.findall(r"\b[a-z]{4,10}\b", text)})


def make_words_context(tokenizer, tokens: int, index: int, seed: int = 0,
                       common: int = 9, common_freq: int = 30, rare_freq: int = 3,
                       choices: int = 5) -> LongContext:
    """Common-word extraction (RULER's CWE, arXiv 2404.06654, as multiple choice): a numbered
    list of about ``tokens`` tokens in which ``common`` words occur ``common_freq`` times each
    and every other word ``rare_freq`` times, in random order. One question per common word:
    which of ``choices`` words (it and ``choices - 1`` rare ones) occurs most often in the
    list. RULER asks for the ten most common words at once and scores recall; one choice per
    question keeps nine questions per context (one prefill) and a yes/no score: correct when
    the reply names the common word and none of the other options. The answer needs counts
    over the whole list, no single passage: the aggregation that a sparse selection can miss."""
    rng = random.Random(f"words-{seed}-{tokens}-{index}")
    pool = word_pool()
    words = rng.sample(pool, len(pool))
    top, spare = words[:common], words[common:]
    head = ("Below is a numbered list of words. Some of the words appear more often than "
            "others.\n")
    budget = tokens - len(tokenizer.encode(head).ids)

    def listing(n_rare: int) -> str:
        items = [w for w in top for _ in range(common_freq)]
        items += [w for w in spare[:n_rare] for _ in range(rare_freq)]
        random.Random(f"words-{seed}-{tokens}-{index}-{n_rare}").shuffle(items)
        return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    n_rare = max(choices, budget // (4 * rare_freq))
    for _ in range(4):  # the rare words' count, scaled until the list fits the length
        used = len(tokenizer.encode(listing(n_rare)).ids)
        n_rare = max(choices, int(n_rare * budget / used) - (used > budget))
    while n_rare > choices and len(tokenizer.encode(listing(n_rare)).ids) > budget:
        n_rare -= max(1, n_rare // 200)
    if n_rare > len(spare):
        raise ValueError(f"{tokens} tokens need {common + n_rare} distinct words; "
                         f"the pool has {len(pool)}")
    rare = spare[:n_rare]
    questions = []
    for w in top:
        others = rng.sample(rare, choices - 1)
        opts = others + [w]
        rng.shuffle(opts)
        questions.append(Question(
            "common_word", "Which of these words appears most often in the list above: "
            f"{', '.join(opts)}? Answer with the word only.", [w], others))
    return LongContext(tokens, index, head + listing(n_rare), questions)


def chat_messages(ctx: LongContext, q: Question) -> list[dict]:
    """One chat turn: the shared context first, the question last (prefix-cache friendly)."""
    return [{"role": "user", "content": f"{ctx.text}\n\n{q.prompt}"}]
