"""Synthetic collaborative personalization data, made so that Per-Pcs' premise holds and can be seen.

Users belong to a few hidden taste groups. Every group sees the same kind of input (a movie blurb, a
product review, a news article) but answers it its own way: another tag, a stricter score, another
headline style. The input alone does not say which answer a user wants, so one shared model cannot
fit every group, while a user's history (20-60 items) gives the group away. Inputs are short
template texts (15-30 words) so that a small model on a CPU handles them quickly. The truth (group of
each user, hidden content of each item) stays out of `users.jsonl`; `save_synthetic` writes the
groups to `groups.json` for analysis.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from perpcs.data import Dataset, Item, Query, User, save_dataset
from perpcs.tasks import Task
from perpcs.utils import write_json

KINDS = ("classification", "rating", "generation")

# --- classification: which tag a user gives a movie -------------------------------------------

# Content category -> (settings, protagonists, events): the words make the category plain.
MOVIES = {
    "space": (
        ["On a crumbling space station orbiting Jupiter", "Aboard a colony ship drifting between stars",
         "On a frozen moon at the edge of the galaxy", "In a research base on the dark side of Mars",
         "On a mining asteroid far from Earth", "In a starship graveyard beyond Neptune"],
        ["a young engineer", "a lonely android", "a veteran pilot", "an exiled astronaut",
         "a stowaway teenager", "a ship's doctor"],
        ["discovers a signal from a lost expedition", "must repair the reactor before the oxygen runs out",
         "makes first contact with a silent alien race", "uncovers a plot to abandon the crew",
         "wakes up centuries after the mission failed", "steers a damaged shuttle through a meteor storm"],
    ),
    "crime": (
        ["In the rain-soaked alleys of 1970s Chicago", "In a casino town in the Nevada desert",
         "In a port city run by smugglers", "In a quiet suburb hiding a ring of forgers",
         "In a glittering Monaco hotel", "In the back rooms of a Naples restaurant"],
        ["a tired police detective", "a retired safecracker", "a rookie reporter", "a getaway driver",
         "a corrupt accountant", "a gifted pickpocket"],
        ["plans one last bank heist with an old crew", "tracks a killer who leaves riddles at each scene",
         "is framed for a murder and goes on the run", "steals a diamond from a ruthless gang boss",
         "testifies against the mob family that raised them", "infiltrates a cartel as an undercover cop"],
    ),
    "love": (
        ["In a seaside village in Portugal", "In a Paris bookshop", "At a summer wedding in Tuscany",
         "In a snowed-in mountain inn", "In a busy New York flower market", "On a slow train across India"],
        ["a shy violinist", "a widowed baker", "a travelling photographer", "a cynical wedding planner",
         "a young nurse", "a heartbroken architect"],
        ["falls for a stranger who leaves town in a week", "rediscovers a first love after twenty years apart",
         "writes letters to a pen pal without knowing who it is",
         "pretends to be engaged to save the family business",
         "must choose between two proposals before the summer ends",
         "shares a table every morning with the same stranger"],
    ),
    "haunted": (
        ["In an abandoned asylum on a foggy hill", "In a Victorian house with a locked attic",
         "In a remote cabin deep in the woods", "In a village where bells ring at midnight",
         "In an old hotel closed since a fire", "In a flooded mine beneath a ghost town"],
        ["a grieving mother", "a group of college friends", "a skeptical paranormal investigator",
         "a new caretaker", "a girl with an imaginary friend", "a priest who lost his faith"],
        ["hears whispers coming from inside the walls", "finds a diary that predicts each death",
         "is hunted by a creature of the dark", "performs a ritual that wakes something ancient",
         "sees the same pale face in every mirror", "finds fresh footprints leading into a sealed cellar"],
    ),
    "war": (
        ["In the trenches of northern France in 1916", "On a Pacific island in 1943",
         "In occupied Warsaw during the winter of 1942", "On a destroyer crossing the Atlantic",
         "In a field hospital behind the front line", "In a besieged mountain fortress"],
        ["a young infantry soldier", "a resistance courier", "a field medic", "a tank commander",
         "a war correspondent", "a codebreaker"],
        ["leads a small squad behind enemy lines", "must deliver a message that could stop an attack",
         "hides refugees from an enemy patrol", "survives a siege that lasts a hundred days",
         "searches for a missing brother after a battle", "defends a bridge against an armoured column"],
    ),
    "school": (
        ["At a strict boarding school in Scotland", "During the last week of high school",
         "At a summer camp by a lake", "In a small-town high school marching band",
         "At a rival school across town", "On a chaotic school trip to London"],
        ["a nerdy exchange student", "a class clown", "a new teacher", "a teenage skateboarder",
         "a shy debate champion", "a substitute gym coach"],
        ["runs for class president against the most popular kid", "leads a team of misfits to the final",
         "organises a secret prom after the real one is cancelled", "swaps lives with a twin for a week",
         "fights to save the school from being closed", "starts a band to win the talent show"],
    ),
}
# Closing sentences that say nothing about the category, for variety.
MOVIE_NOTES = [
    "The story unfolds over a single night.", "Told in flashbacks.", "Shot in muted colours.",
    "The ending leaves much unsaid.", "Narrated by the older hero.", "It runs just under two hours.",
    "Filmed with an unknown cast.", "Adapted from a little-known stage play.",
]
TAGS = ["sci-fi", "crime", "romance", "horror", "action", "comedy", "dark comedy", "thought-provoking"]
# Category -> the tag each taste group gives it (column = group). Every row holds distinct tags, so
# the groups disagree on every category and a vote over all users is right for about one group only.
MOVIE_TAGS = {
    "space": ("sci-fi", "action", "comedy", "thought-provoking"),
    "crime": ("crime", "thought-provoking", "dark comedy", "action"),
    "love": ("romance", "dark comedy", "thought-provoking", "comedy"),
    "haunted": ("horror", "comedy", "action", "dark comedy"),
    "war": ("action", "horror", "dark comedy", "thought-provoking"),
    "school": ("comedy", "romance", "thought-provoking", "horror"),
}


def _movie(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(list(MOVIES))
    settings, heroes, events = MOVIES[category]
    text = f"{rng.choice(settings)}, {rng.choice(heroes)} {rng.choice(events)}. {rng.choice(MOVIE_NOTES)}"
    return text, category


def _tag(group: int, category: str) -> str:
    return MOVIE_TAGS[category][group]


def _other_tags(group: int, category: str) -> list[str]:
    return [t for t in TAGS if t != _tag(group, category)]


# --- rating: how strictly a user scores a review -----------------------------------------------

PRODUCTS = ["blender", "pair of headphones", "desk lamp", "backpack", "coffee grinder", "phone case",
            "electric kettle", "yoga mat", "wireless mouse", "rain jacket", "air fryer", "kids' scooter"]
PURPOSES = ["for my new flat", "as a gift for my sister", "to replace an old one", "for daily commuting",
            "after reading a few reviews", "on sale last month"]
# True quality 1..5 -> wordings of it.
QUALITY = {
    1: ["It stopped working after two days and support never replied",
        "Cheap plastic that cracked the first time I used it", "Nothing works as described and it smells awful",
        "It arrived broken and the replacement was broken too", "A complete waste of money that I regret buying"],
    2: ["It works, but the build feels flimsy and loose", "Disappointing, it is much slower than promised",
        "Usable, though half the features are clumsy", "It does the basics but already shows wear",
        "Below what I expected for the price, with several small faults"],
    3: ["It does the job, nothing more and nothing less", "Average quality, fine for the price",
        "Some parts are good and some are annoying", "Decent enough, though I would not rave about it",
        "It is okay and works as described, no surprises"],
    4: ["Solid build and it works well, just a few minor quirks", "Very good overall, only the cable is a bit short",
        "Reliable and well made, I would buy it again", "Works nicely and looks good, with small room for improvement",
        "Pleasantly surprised, it is better than my old one"],
    5: ["Absolutely perfect, it exceeds every expectation", "Outstanding quality, I use it every day and love it",
        "Flawless from day one, the best purchase I made this year", "Superb design and it works brilliantly",
        "Excellent in every way, I recommend it to everyone"],
}
REVIEW_NOTES = ["Delivery took about a week.", "The box was smaller than I thought.", "It comes in three colours.",
                "I have had it for a month now.", "My partner uses it too.", "Setup took a few minutes.",
                "The manual is in four languages.", "I ordered the grey version."]
# Taste group -> the score it gives for true quality 1..5: fair, harsh, generous, polarised.
STRICTNESS = [(1, 2, 3, 4, 5), (1, 1, 2, 3, 4), (2, 3, 4, 5, 5), (1, 1, 3, 5, 5)]


def _review(rng: random.Random) -> tuple[str, str]:
    quality = rng.randint(1, 5)
    text = (f"I bought this {rng.choice(PRODUCTS)} {rng.choice(PURPOSES)}. "
            f"{rng.choice(QUALITY[quality])}. {rng.choice(REVIEW_NOTES)}")
    return text, str(quality)


def _score(group: int, quality: str) -> str:
    return str(STRICTNESS[group][int(quality) - 1])


def _near_scores(group: int, quality: str) -> list[str]:
    """Rating noise is a slip to a neighbouring score, as real users slip."""
    s = int(_score(group, quality))
    return [str(v) for v in (s - 1, s + 1) if 1 <= v <= 5]


# --- generation: the style of a user's headline ------------------------------------------------

SUBJECTS = ["the city council", "a local bakery", "the national museum", "a regional airline",
            "the university hospital", "a youth football club", "the public library", "a small tech startup",
            "the state zoo", "a family-run winery"]
ACTIONS = [("open", "a second location"), ("close", "its oldest branch"), ("hire", "fifty new workers"),
           ("cut", "its opening hours"), ("launch", "a free weekend program"), ("delay", "its planned expansion"),
           ("win", "a national award"), ("cancel", "its summer festival"), ("sell", "its historic building"),
           ("build", "a new car park"), ("host", "a charity marathon"), ("double", "its repair budget"),
           ("ban", "plastic bags"), ("reopen", "its main hall")]
PLACES = ["Riverside", "Oakdale", "Port Ellis", "Milltown", "Greenfield", "Westbrook", "Cedar Falls", "Lakeview",
          "Brighton Hill", "Stonebridge"]
DAYS = ["on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday"]
REASONS = ["citing rising costs", "after months of talks", "following a record year",
           "after complaints from residents", "as part of a ten-year plan", "despite opposition from neighbours",
           "to attract more visitors", "after a surprise donation"]
ARTICLE_NOTES = ["Details will be shared next month.", "Local residents had mixed reactions.",
                 "The decision was approved by a narrow vote.", "A spokesperson called it an important step.",
                 "Work is expected to begin in the spring.", "Similar moves have been seen in nearby towns."]


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def _headline_words(text: str) -> str:
    """Headlines drop the leading article: 'the city council' -> 'city council'."""
    first, _, rest = text.partition(" ")
    return rest if first in ("a", "an", "the", "its") else text


# Taste group -> headline style, from the parts (subject, verb, object, place).
HEADLINE_STYLES: list[Callable[[str, str, str, str], str]] = [
    lambda s, v, o, p: " ".join(w[:1].upper() + w[1:] for w in f"{s} to {v} {o} in {p}".split()),  # Title Case
    lambda s, v, o, p: f"{s} to {v} {o} in {p}".lower(),  # all lowercase
    lambda s, v, o, p: "BREAKING: " + _sentence_case(f"{s} to {v} {o} in {p}"),  # fixed prefix
    lambda s, v, o, p: f"Will {s} {v} {o} in {p}?",  # question
]


def _article(rng: random.Random) -> tuple[str, str]:
    subject, (verb, obj), place = rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES)
    text = (f"{_sentence_case(subject)} said {rng.choice(DAYS)} it will {verb} {obj} in {place}, "
            f"{rng.choice(REASONS)}. {rng.choice(ARTICLE_NOTES)}")
    return text, "|".join((_headline_words(subject), verb, _headline_words(obj), place))


def _headline(group: int, parts: str) -> str:
    return HEADLINE_STYLES[group](*parts.split("|"))


def _other_styles(group: int, parts: str) -> list[str]:
    return [_headline(g, parts) for g in range(len(HEADLINE_STYLES)) if g != group]


# --- the generator ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    task: Task
    draw: Callable[[random.Random], tuple[str, str]]  # rng -> (input text, hidden content)
    rule: Callable[[int, str], str]  # (group, hidden content) -> the group's answer
    slips: Callable[[int, str], list[str]]  # (group, hidden content) -> what a noisy answer may be instead
    n_groups: int


SPECS = {
    "classification": _Kind(
        Task(name="synth-movie-tags", kind="classification", labels=TAGS, input_name="Movie", output_name="Tag",
             instruction="Which tag would this user give this movie? Answer with the tag only.", max_new_tokens=6),
        _movie, _tag, _other_tags, len(MOVIE_TAGS["space"])),
    "rating": _Kind(
        Task(name="synth-product-ratings", kind="rating", scale=(1, 5), input_name="Review", output_name="Score",
             instruction="What score from 1 to 5 would this user give the product in this review? "
                         "Answer with the number only.", max_new_tokens=2),
        _review, _score, _near_scores, len(STRICTNESS)),
    "generation": _Kind(
        Task(name="synth-headlines", kind="generation", input_name="Article", output_name="Headline",
             instruction="Write a headline for this article in the style of this user.", max_new_tokens=20),
        _article, _headline, _other_styles, len(HEADLINE_STYLES)),
}


class Synthetic(Dataset):
    """A data set plus the hidden truth behind it, for tests and analysis (never in users.jsonl)."""

    groups: dict[str, int]  # user_id -> taste group
    latent: dict[str, list[str]]  # user_id -> hidden content of each history item, then of each query


def rule(kind: str, group: int, latent: str) -> str:
    """The noise-free answer of taste `group` to an item with hidden content `latent`."""
    return _spec(kind).rule(group, latent)


def _spec(kind: str) -> _Kind:
    if kind not in SPECS:
        raise ValueError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return SPECS[kind]


def _answer(spec: _Kind, group: int, latent: str, noise: float, rng: random.Random) -> str:
    """The group's answer, except with probability `noise` a different one (generation: another style)."""
    if rng.random() >= noise:
        return spec.rule(group, latent)
    return rng.choice(spec.slips(group, latent))


def _fresh(draw: Callable[[random.Random], tuple[str, str]], rng: random.Random, seen: set[str]) -> tuple[str, str]:
    """A draw whose text is new to the whole data set, so no item repeats (within or across users)."""
    for _ in range(1000):
        text, latent = draw(rng)
        if text not in seen:
            seen.add(text)
            return text, latent
    raise ValueError(f"the word lists ran out of new items after {len(seen)}; ask for fewer users or items")


def synthesize(kind: str, n_users: int = 60, seed: int = 0, history: tuple[int, int] = (20, 60),
               n_queries: int = 4, groups: int = 4, noise: float = 0.1) -> Synthetic:
    """Users in `groups` balanced taste groups, each with a history of `history` items and `n_queries` held-out
    queries; every answer follows the user's group except with probability `noise`. Deterministic by seed."""
    spec = _spec(kind)
    lo, hi = history
    if n_users < 1 or n_queries < 0 or not 1 <= lo <= hi:
        raise ValueError(f"need n_users >= 1, n_queries >= 0 and 1 <= history min <= max; "
                         f"got n_users={n_users}, n_queries={n_queries}, history={tuple(history)}")
    if not 1 <= groups <= spec.n_groups:
        raise ValueError(f"groups must be 1..{spec.n_groups} for kind {kind!r}, got {groups}")
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    rng = random.Random(seed)
    assigned = [i % groups for i in range(n_users)]
    rng.shuffle(assigned)
    seen: set[str] = set()
    width = len(str(n_users - 1))
    users, truth, latent = [], {}, {}
    for i, group in enumerate(assigned):
        uid = f"u{i:0{width}d}"
        n_hist = rng.randint(lo, hi)
        drawn = [_fresh(spec.draw, rng, seen) for _ in range(n_hist + n_queries)]
        answers = [_answer(spec, group, lat, noise, rng) for _, lat in drawn]
        users.append(User(
            user_id=uid,
            history=[Item(input=t, output=a) for (t, _), a in zip(drawn[:n_hist], answers)],
            queries=[Query(id=f"{uid}-q{j}", input=t, output=a)
                     for j, ((t, _), a) in enumerate(zip(drawn[n_hist:], answers[n_hist:]))],
        ))
        truth[uid] = group
        latent[uid] = [lat for _, lat in drawn]
    return Synthetic(task=spec.task, users=users, groups=truth, latent=latent)


def save_synthetic(ds: Synthetic, folder: str | Path) -> Path:
    """The data contract (`task.json`, `users.jsonl`) plus `groups.json` (user_id -> taste group)."""
    folder = save_dataset(ds, folder)
    write_json(folder / "groups.json", ds.groups)
    return folder
