"""Built-in data: seeded, unbounded multi-operation arithmetic word problems with worked solutions ending in `#### N`.

This is the default training data, so the main job runs on a fresh machine with nothing downloaded. The
solutions follow GSM8K's style (one operation a line, `<<a+b=c>>` calculator annotations, final `#### N`), so a
model trained on them answers in the format that GSM8K scoring reads. Problem `i` of seed `s` depends only on
`(s, i)`, so any document can be regenerated without producing the ones before it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

_NAMES = [
    "Ava", "Ben", "Chloe", "Dev", "Emma", "Felix", "Grace", "Hugo", "Isla", "Jamal", "Kira", "Leo", "Maya", "Noah",
    "Olivia", "Priya", "Quinn", "Ravi", "Sofia", "Tom", "Uma", "Victor", "Wen", "Yusuf", "Zoe",
]  # fmt: skip
_ITEMS = [
    "apples", "marbles", "stickers", "books", "coins", "pencils", "stamps", "cookies", "shells", "cards", "beads",
    "eggs", "flowers", "toy cars", "candles", "buttons",
]  # fmt: skip
_CONTAINERS = ["boxes", "bags", "jars", "packs", "baskets", "crates"]


@dataclass(frozen=True)
class ArithmeticProblem:
    """One generated word problem."""

    question: str
    """The problem statement, ending in a question."""
    solution: str
    """Worked solution, one operation a line, the last line `#### N`."""
    answer: int
    """The final number."""


def _operation(rng: random.Random, name: str, item: str, value: int) -> tuple[str, str, int]:
    """Pick one operation applicable to `value`; return (question sentence, solution line, new value)."""
    ops = ["add", "add_groups", "multiply"]
    if value > 1:
        ops.append("subtract")
    divisors = [d for d in (2, 3, 4, 5) if value % d == 0 and value // d > 0]
    if divisors:
        ops.append("divide")
    op = rng.choice(ops)
    if op == "add":
        n = rng.randint(2, 40)
        new = value + n
        return (
            f"Then {name} finds {n} more {item}.",
            f"After finding {n} more, {name} has {value}+{n} = <<{value}+{n}={new}>>{new} {item}.",
            new,
        )
    if op == "add_groups":
        k, m = rng.randint(2, 6), rng.randint(2, 12)
        box = rng.choice(_CONTAINERS)
        got = k * m
        new = value + got
        return (
            f"Then {name} buys {k} {box} with {m} {item} in each.",
            f"The {box} hold {k}*{m} = <<{k}*{m}={got}>>{got} {item}, so {name} has "
            f"{value}+{got} = <<{value}+{got}={new}>>{new} {item}.",
            new,
        )
    if op == "multiply":
        k = rng.choice((2, 3))
        word, noun = {2: ("doubles", "Doubling"), 3: ("triples", "Tripling")}[k]
        new = value * k
        return (
            f"Then {name} {word} the number of {item}.",
            f"{noun} gives {value}*{k} = <<{value}*{k}={new}>>{new} {item}.",
            new,
        )
    if op == "subtract":
        n = rng.randint(1, value - 1)
        new = value - n
        return (
            f"Then {name} gives away {n} {item}.",
            f"After giving {n} away, {name} has {value}-{n} = <<{value}-{n}={new}>>{new} {item}.",
            new,
        )
    d = rng.choice(divisors)
    new = value // d
    return (
        f"Then {name} shares the {item} equally among {d} friends and keeps one share.",
        f"One share is {value}/{d} = <<{value}/{d}={new}>>{new} {item}.",
        new,
    )


def arithmetic_problem(seed: int, index: int, min_operations: int = 2, max_operations: int = 5) -> ArithmeticProblem:
    """Problem number `index` of the stream with `seed` (a pure function of both)."""
    rng = random.Random(f"loopfit-arithmetic:{seed}:{index}")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(3, 60)
    sentences = [f"{name} has {value} {item}."]
    lines = [f"{name} starts with {value} {item}."]
    for _ in range(rng.randint(min_operations, max_operations)):
        sentence, line, value = _operation(rng, name, item, value)
        sentences.append(sentence)
        lines.append(line)
    sentences.append(f"How many {item} does {name} have now?")
    lines.append(f"#### {value}")
    return ArithmeticProblem(question=" ".join(sentences), solution="\n".join(lines), answer=value)


def arithmetic_problems(seed: int = 0, start: int = 0) -> Iterator[ArithmeticProblem]:
    """The unbounded stream of problems for `seed`, from problem number `start` on."""
    index = start
    while True:
        yield arithmetic_problem(seed, index)
        index += 1
