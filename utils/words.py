"""English for counts in log lines: '1 bus', '2 buses', '3 people', not '2 buss'."""
from __future__ import annotations

# names whose plural is not the regular one (COCO's among them); names already plural stay as they are
IRREGULAR = {
    "person": "persons", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
    "scissors": "scissors", "fish": "fish", "deer": "deer", "child": "children", "man": "men", "woman": "women",
    "leaf": "leaves", "shelf": "shelves", "wolf": "wolves", "foot": "feet", "tooth": "teeth", "goose": "geese",
    "glasses": "glasses", "series": "series", "species": "species", "aircraft": "aircraft",
}


def plural(name: str, n: int) -> str:
    """`name` as it reads after the count n; only the last word of a multi-word name changes."""
    if n == 1 or not name:
        return name
    head, _, last = name.rpartition(" ")
    low = last.lower()
    if low in IRREGULAR:
        word = IRREGULAR[low] if last.islower() else last  # (a capitalised name is likely a proper noun)
    elif not last[-1:].isalpha():
        word = last  # codes, numbers, symbols: leave them alone
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif low.endswith("y") and low[-2:-1] not in set("aeiou"):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word
