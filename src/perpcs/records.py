"""What every importer shares: its options and report, the records it reads, and the one step that
cleans them and splits each user into history and held-out queries (see `importers`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field

from perpcs.data import Dataset, Item, Query, User
from perpcs.errors import InputError
from perpcs.tasks import Task


class ImportOptions(BaseModel):
    min_history: int = Field(5, ge=0)  # users with fewer history items (after cleaning) are dropped
    n_queries: int = Field(1, ge=0)  # held-out queries per user: its newest items
    max_tokens: int | None = Field(256, ge=1)  # inputs cut to this many whitespace-separated words
    seed: int = 0  # orders items that carry no time (annotator-csv)
    target: Literal["rating", "title"] = "rating"  # amazon-reviews
    label: str = "valence"  # annotator-csv: the label column
    kind: Literal["rating", "classification"] = "rating"  # annotator-csv
    top_tags: int = Field(15, ge=1)  # lastfm-tags: label set = the most used tags
    max_users: int | None = Field(None, ge=1)  # keep the N most active users (ties by id)
    task: str | None = None  # lamp / perpcs: a LaMP preset name


class ImportReport(BaseModel):
    format: str
    records_read: int = 0
    items_dropped: dict[str, int] = Field(default_factory=dict)  # reason -> count
    users_found: int = 0
    users_dropped: dict[str, int] = Field(default_factory=dict)  # reason -> count
    users_kept: int = 0
    history_items: int = 0
    queries: int = 0

    def drop_item(self, reason: str, n: int = 1) -> None:
        self.items_dropped[reason] = self.items_dropped.get(reason, 0) + n

    def drop_user(self, reason: str) -> None:
        self.users_dropped[reason] = self.users_dropped.get(reason, 0) + 1


class Record(NamedTuple):
    user: str
    order: tuple  # sort key within the user: time first, then a tie-breaker
    id: str  # query id, unique in the data set
    input: str
    output: str



def natural_order(s: str) -> tuple:
    """Numeric ids sort as numbers (2 before 10), others as text after them."""
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def value_order(v: str) -> tuple:
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def clip(text: str, max_tokens: int | None) -> str:
    """Collapse whitespace and keep the first `max_tokens` whitespace-separated words."""
    words = text.split()
    return " ".join(words if max_tokens is None else words[:max_tokens])


def build_dataset(task: Task, records: list[Record], found: set[str] | None, opts: ImportOptions,
           report: ImportReport) -> Dataset:
    """Clean, order and de-duplicate each user's items; the newest `n_queries` become queries.

    Duplicates are items of one user with the same (cleaned, clipped) input: the oldest is kept, so
    no query's input is ever in the same user's history.
    """
    items: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        r = r._replace(input=clip(r.input, opts.max_tokens), output=" ".join(r.output.split()))
        if not r.input:
            report.drop_item("no_text")
        elif not r.output:
            report.drop_item("no_output")
        else:
            items[r.user].append(r)
    users = []
    for user in sorted(found if found is not None else {r.user for r in records}, key=natural_order):
        seen, ids, kept = set(), Counter(), []
        for r in sorted(items.get(user, []), key=lambda r: r.order):
            if r.input in seen:
                report.drop_item("duplicate")
            else:
                seen.add(r.input)
                ids[r.id] += 1  # e.g. two different reviews of one product: ids stay unique
                kept.append(r if ids[r.id] == 1 else r._replace(id=f"{r.id}#{ids[r.id]}"))
        cut = max(len(kept) - opts.n_queries, 0)
        users.append(User(user_id=user, history=[Item(input=r.input, output=r.output) for r in kept[:cut]],
                          queries=[Query(id=r.id, input=r.input, output=r.output) for r in kept[cut:]]))
    return select_users(Dataset(task=task, users=users), opts, report)


def select_users(ds: Dataset, opts: ImportOptions, report: ImportReport) -> Dataset:
    """Keep users with `min_history` history items and `n_queries` queries; then the `max_users` most active."""
    report.users_found = len(ds.users)
    ok = []
    for u in ds.users:
        if not u.history and not u.queries:
            report.drop_user("no_usable_items")
        elif len(u.history) < opts.min_history or len(u.queries) < opts.n_queries:
            report.drop_user("too_few_items")
        else:
            ok.append(u)
    if opts.max_users is not None and len(ok) > opts.max_users:
        active = sorted(ok, key=lambda u: (-(len(u.history) + len(u.queries)), natural_order(u.user_id)))
        keep = {u.user_id for u in active[: opts.max_users]}
        for _ in range(len(ok) - len(keep)):
            report.drop_user("max_users")
        ok = [u for u in ok if u.user_id in keep]
    report.users_kept = len(ok)
    report.history_items = sum(len(u.history) for u in ok)
    report.queries = sum(len(u.queries) for u in ok)
    if len(ok) < 2:
        raise InputError(f"{report.format}: only {len(ok)} usable user(s) of {report.users_found} found "
                         f"(users dropped: {_counts(report.users_dropped)}; items dropped: "
                         f"{_counts(report.items_dropped)}); a data set needs at least 2 users "
                         f"(min_history={opts.min_history}, n_queries={opts.n_queries})")
    return Dataset(task=ds.task, users=ok)


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "none"
