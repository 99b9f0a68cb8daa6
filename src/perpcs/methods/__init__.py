"""The bench's methods, registered by name: each a small `Method` in its own module of this package.

A method turns one target user into a personalised model on the run's merged (task-adapted) model;
generation, scoring and costs are the bench's. A method declares what it `needs` prepared before
its clock starts (`NEEDS`), whether it trains per target (then `--oppu-targets` limits it), and
the name of its row with BM25 retrieval in the prompt (`rag_row`; None: no such row).
To add one: a module here with a `@register`ed subclass of `Method`, its name in `BUILTIN`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from perpcs.data import User
    from perpcs.runfolder import RunFolder
    from perpcs.settings import BenchSettings

# the built-in methods, in the order of their rows
BUILTIN = ("non_personalized", "peft_retrieval", "oppu", "perpcs", "prime")
# what a method may need prepared: the run's pool; the sharers' history embeddings (to find the nearest)
NEEDS = frozenset({"pool", "sharer_embeddings"})


@dataclass
class Personalized:
    """What a method gives one user: the model to generate with (the merged model itself, or a peft
    model wrapped around it that the bench unloads afterwards), seconds of personalisation, bytes stored."""

    model: Any
    seconds: float = 0.0
    nbytes: int = 0
    rag_k: int = 0


class Context:
    """What every method reads: the run, the bench's settings and output folder, and the merged model."""

    def __init__(self, run: RunFolder, settings: BenchSettings, out: Path):
        self.run, self.settings, self.out = run, settings, out
        self.model, self.tok = run.merged

    @cached_property
    def pool(self):
        return self.run.open_pool()

    @cached_property
    def sharers(self) -> list[str]:
        return [s.user_id for s in self.run.selection()]

    @cached_property
    def sharer_embeddings(self):
        from perpcs.selection import history_embeddings

        return history_embeddings(self.run.users(self.sharers))

    def prepare(self, needs: frozenset[str]) -> None:
        """Load what a method needs now, so that no user's personalisation time includes it."""
        for need in sorted(needs):
            getattr(self, need)

    def nearest_sharers(self, user: User, m: int) -> list[str]:
        """The m sharers whose mean history embedding is closest to the user's."""
        from perpcs.selection import history_embeddings, nearest_users

        idx = nearest_users(history_embeddings([user])[0], self.sharer_embeddings, m)
        return [self.sharers[i] for i in idx]


class Method:
    """A bench method. Subclasses set `name` (and `rag_row`, `needs`, `trains_per_target`) and
    implement `personalize`."""

    name: ClassVar[str]
    rag_row: ClassVar[str | None] = None
    needs: ClassVar[frozenset[str]] = frozenset()
    trains_per_target: ClassVar[bool] = False

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def personalize(self, user: User) -> Personalized:
        raise NotImplementedError


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under its `name`."""
    unknown = set(cls.needs) - NEEDS
    if unknown:
        raise ValueError(f"method {cls.name!r}: unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
    taken = {r for other in REGISTRY.values() if other is not cls for r in (other.name, other.rag_row)}
    if cls.name in taken or (cls.rag_row and cls.rag_row in taken):
        raise ValueError(f"method {cls.name!r}: its name or row is already registered")
    REGISTRY[cls.name] = cls
    return cls


def methods() -> dict[str, type[Method]]:
    """The registry, with the built-in methods loaded."""
    for name in BUILTIN:
        importlib.import_module(f"perpcs.methods.{name}")
    return REGISTRY


def rows() -> list[str]:
    """Every row a bench can run: each method, then its +rag row if it has one."""
    return [r for m in methods().values() for r in (m.name, m.rag_row) if r]


def method_of(row: str) -> tuple[type[Method], bool]:
    """(the method, whether with retrieval) of a row name; an unknown name is an error naming the known ones."""
    for m in methods().values():
        if row in (m.name, m.rag_row):
            return m, row == m.rag_row
    raise ValueError(f"unknown method {row!r}; known: {', '.join(rows())}")


def split_method(row: str) -> tuple[str, bool]:
    """('oppu', True) for 'oppu+rag'; 'rag' is the non-personalized model with retrieval. Rows of
    Per-Pcs variants (not registered) split by their '+rag' suffix."""
    for m in methods().values():
        if row == m.rag_row:
            return m.name, True
    return row.removesuffix("+rag"), row.endswith("+rag")
