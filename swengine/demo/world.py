"""A small procedurally generated world and its language, for the offline demo.

Everything here is generated from a seed, so the demo corpus, the demo base model (pretrained by
``tools/make_demo_model.py``) and the demo fine-tuning data are reproducible and ours.

The base model learns the language and a few chat tasks (facts about the world, sums, copying
a list of words). The demo LoRA then teaches a skill the base model never saw: *reversing* a
list of words — close enough to copying to be learnt in a minute on a CPU, and measurable by
exact match before and after.
"""

from __future__ import annotations

import random

NOUNS = ["cat", "dog", "bird", "fish", "fox", "owl", "bear", "frog", "mouse", "horse", "cow", "goat", "duck",
         "bee", "wolf", "lion", "crab", "deer", "seal", "hare"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
ADJECTIVES = ["big", "small", "old", "young", "happy", "sad", "fast", "slow", "quiet", "loud"]
VERBS = ["sees", "likes", "chases", "finds", "helps", "follows", "meets", "watches"]
PLACES = ["house", "tree", "river", "hill", "forest", "garden", "field", "lake", "cave", "barn"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
LIST_WORDS = NOUNS + COLORS + PLACES

# fixed facts of the world (the same for every seed: they are the world)
_facts = random.Random(1234)
COLOR_OF = {n: _facts.choice(COLORS) for n in NOUNS}
HOME_OF = {n: _facts.choice(PLACES) for n in NOUNS}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    a, b = rng.sample(NOUNS, 2)
    if kind == 0:
        return f"the {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} the {b} ."
    if kind == 1:
        return f"the {a} is {COLOR_OF[a]} ."
    if kind == 2:
        return f"the {a} lives in the {HOME_OF[a]} ."
    if kind == 3:
        x, y = rng.randrange(11), rng.randrange(11)
        return f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]} ."
    if kind == 4:
        c = rng.choice(NOUNS)
        return f"the {a} , the {b} and the {c} are friends ."
    return f"the {a} {rng.choice(VERBS)} the {b} near the {rng.choice(PLACES)} ."


def document(rng: random.Random, sentences: int = 6) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def word_list(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    return [rng.choice(LIST_WORDS) for _ in range(rng.randint(lo, hi))]


def base_task(rng: random.Random) -> list[dict]:
    """A chat exchange of a task the base model is pretrained on."""
    kind = rng.randrange(4)
    a = rng.choice(NOUNS)
    if kind == 0:
        q, ans = f"What color is the {a}?", f"The {a} is {COLOR_OF[a]}."
    elif kind == 1:
        q, ans = f"Where does the {a} live?", f"The {a} lives in the {HOME_OF[a]}."
    elif kind == 2:
        x, y = rng.randrange(11), rng.randrange(11)
        q, ans = f"What is {NUMBERS[x]} plus {NUMBERS[y]}?", f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}."
    else:
        words = word_list(rng)
        q, ans = f"Repeat: {' '.join(words)}", " ".join(words)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]


def reverse_task(rng: random.Random) -> list[dict]:
    """The new skill the demo LoRA teaches (2-3 words: learnable in a minute of CPU LoRA)."""
    words = word_list(rng, 2, 3)
    return [{"role": "user", "content": f"Reverse: {' '.join(words)}"},
            {"role": "assistant", "content": " ".join(reversed(words))}]


def reverse_dataset(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": reverse_task(rng)} for _ in range(n)]
