"""Importers: public per-user data sets, in their original file formats, to the data contract.

Each format reads its files into records (user, order, id, input, output); one shared step then
cleans them (whitespace, empty texts, duplicates, truncation), splits each user into history and
held-out queries (the newest `n_queries` items) and keeps the users with enough history. The
`ImportReport` says what was dropped and why, because a silent filter is how leaks and tiny
populations go unnoticed. See docs/data.md, "Importing public data sets".
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

from perpcs.data import Dataset
from perpcs.errors import InputError
from perpcs.records import ImportOptions, ImportReport, Record, build_dataset, natural_order, select_users, value_order
from perpcs.tasks import Task, fmt_num
from perpcs.utils import open_binary, parse_json, reading, text_lines

# ---------------------------------------------------------------- reading files


def _json_lines(path: Path) -> Iterator[tuple[str, dict]]:
    for n, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        obj = parse_json(line, where, lines=False)
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def _field(obj: dict, name: str, where: str):
    if obj.get(name) is None or not str(obj[name]).strip():
        raise InputError(f"{where}: missing field '{name}'")
    return obj[name]


def _int(value: str, name: str, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{where}: field '{name}': {value!r} is not an integer") from None


def _float(value, name: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"{where}: field '{name}': {value!r} is not a number")
    return number


def _lines(path: Path, encoding: str) -> Iterator[str]:
    return (line for _, line in text_lines(path, encoding))


def _header(path: Path, delimiter: str, encoding: str = "utf-8") -> list[str]:
    lines = _lines(path, encoding)
    try:
        return [h.strip() for h in next(csv.reader(lines, delimiter=delimiter), [])]
    except csv.Error as e:
        raise InputError(f"{path}: line 1: {e}") from None
    finally:
        lines.close()


def _rows(path: Path, required: Iterable[str], delimiter: str = ",", encoding: str = "utf-8",
          ) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of a CSV/TSV file with a header; a row lacking a required field is an error."""
    tsv = delimiter == "\t"  # HetRec .dat files: no quoting, names may contain quotes
    reader = csv.DictReader(_lines(path, encoding), delimiter=delimiter, restval="",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    try:
        reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            for name in required:
                if not (row.get(name) or "").strip():
                    raise InputError(f"{where}: missing field '{name}'")
            yield where, row
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num}: {e}") from None


def _encoding(path: Path) -> str:
    """HetRec ships tags.dat in Latin-1 and artists.dat in UTF-8: UTF-8 when the file decodes as it."""
    with reading(path), open_binary(path) as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"


def _exists(sources: list[Path]) -> list[Path]:
    for p in sources:
        if not p.exists():
            raise FileNotFoundError(f"{p}: not found")
    return sources


# ---------------------------------------------------------------- formats


def amazon_reviews(sources: list[Path], opts: ImportOptions, report: ImportReport | None = None) -> Dataset:
    """Amazon Review Data (2018) JSON lines: review text -> the reviewer's stars, or its summary."""
    report = report or ImportReport(format="amazon-reviews")
    records = []
    for path in _exists(sources):
        for where, r in _json_lines(path):
            report.records_read += 1
            user, asin = str(_field(r, "reviewerID", where)), str(_field(r, "asin", where))
            time = _int(_field(r, "unixReviewTime", where), "unixReviewTime", where)
            if opts.target == "rating":
                stars = _float(_field(r, "overall", where), "overall", where)
                if not 1 <= stars <= 5:
                    raise InputError(f"{where}: field 'overall': {stars} is not in [1, 5]")
                output = fmt_num(stars)
            else:
                output = str(r.get("summary") or "")
            records.append(Record(user, (time, asin), f"{user}/{asin}", str(r.get("reviewText") or ""), output))
    name = re.sub(r"\.json(l)?(\.gz)?$", "", sources[0].name)
    if opts.target == "rating":
        task = Task(name=f"amazon-{name}-rating", kind="rating", scale=(1, 5), max_new_tokens=3,
                    instruction="What is the score of this review, from 1 to 5? Answer with the number only.",
                    input_name="Review", output_name="Score")
    else:
        task = Task(name=f"amazon-{name}-title", kind="generation", max_new_tokens=24,
                    instruction="Write the title this reviewer gives to this review.",
                    input_name="Review", output_name="Title")
    return build_dataset(task, records, None, opts, report)


def annotator_csv(sources: list[Path], opts: ImportOptions, report: ImportReport | None = None) -> Dataset:
    """PEFT-U/StudEmo tables: a text -> this annotator's value of `opts.label`; each annotator a user."""
    report = report or ImportReport(format="annotator-csv")
    if len(_exists(sources)) != 2:
        raise InputError(f"annotator-csv needs two files (texts and annotations), got {len(sources)}")
    roles = {}
    for p in sources:
        cols = _header(p, ",")
        role = "annotations" if "annotator_id" in cols else "texts" if {"text_id", "text"} <= set(cols) else None
        if role is None:
            raise InputError(f"{p}: header {cols} is neither a texts table (text_id, text) "
                             "nor an annotations table (text_id, annotator_id, <labels>)")
        if role in roles:
            raise InputError(f"{roles[role]} and {p} are both {role} tables; give one texts and one annotations file")
        roles[role] = p
        if role == "annotations" and opts.label not in cols:
            raise InputError(f"{p}: no column '{opts.label}' (--label); columns: {', '.join(cols)}")
    texts = {r["text_id"].strip(): r["text"] for _, r in _rows(roles["texts"], ["text_id"])}

    values: dict[str, list[tuple[str, str]]] = defaultdict(list)  # annotator -> [(text_id, value)]
    for where, r in _rows(roles["annotations"], ["text_id", "annotator_id"]):
        report.records_read += 1
        tid, value = r["text_id"].strip(), (r[opts.label] or "").strip()
        if tid not in texts:
            raise InputError(f"{where}: field 'text_id': {tid!r} is not in {roles['texts']}")
        if value and (opts.kind == "rating" or value_order(value)[0] == 0):
            value = fmt_num(_float(value, opts.label, where))  # "2.0" -> "2"
        values[r["annotator_id"].strip()].append((tid, value))

    records = []
    for user, pairs in values.items():
        # No timestamps: a per-user shuffle, seeded, makes the queries a random held-out part.
        pairs.sort(key=lambda p: natural_order(p[0]))
        random.Random(f"{opts.seed}/{user}").shuffle(pairs)
        records += [Record(user, (i,), f"{user}/{tid}", texts[tid] or "", v) for i, (tid, v) in enumerate(pairs)]

    seen = sorted({r.output for r in records if r.output}, key=value_order)
    if not seen:
        raise InputError(f"{roles['annotations']}: column '{opts.label}' has no values")
    label = opts.label.replace("_", " ")
    if opts.kind == "rating":
        lo, hi = float(seen[0]), float(seen[-1])
        if lo == hi:
            raise InputError(f"{roles['annotations']}: column '{opts.label}' has a single value {seen[0]}; "
                             "a rating needs a range (try --kind classification?)")
        task = Task(name=f"annotator-{opts.label}", kind="rating", scale=(lo, hi), max_new_tokens=3,
                    instruction=f"How does this annotator rate the {label} of this text, from {fmt_num(lo)} "
                                f"to {fmt_num(hi)}? Answer with the number only.",
                    input_name="Text", output_name=label.capitalize())
    else:
        task = Task(name=f"annotator-{opts.label}", kind="classification", labels=seen, max_new_tokens=4,
                    instruction=f"Which {label} value does this annotator give this text? Answer with the value only.",
                    input_name="Text", output_name=label.capitalize())
    return build_dataset(task, records, None, opts, report)


_LASTFM = {
    "artists": {"id", "name"},
    "tags": {"tagID", "tagValue"},
    "taggings": {"userID", "artistID", "tagID", "day", "month", "year"},
}


def lastfm_tags(sources: list[Path], opts: ImportOptions, report: ImportReport | None = None) -> Dataset:
    """HetRec 2011 Last.fm: artist -> the tag this user gave it, among the `top_tags` most used tags.

    A user who gave one artist several kept tags yields one item: the tag most used overall
    (the others count as duplicates), dated by that tagging.
    """
    report = report or ImportReport(format="lastfm-tags")
    files = _lastfm_files(_exists(sources))
    enc = {role: _encoding(p) for role, p in files.items()}
    artists = {r["id"].strip(): r["name"] for _, r in _rows(files["artists"], ["id"], "\t", enc["artists"])}
    tags = {r["tagID"].strip(): r["tagValue"].strip() for _, r in _rows(files["tags"], ["tagID"], "\t", enc["tags"])}
    rows = []
    for where, r in _rows(files["taggings"], _LASTFM["taggings"], "\t", enc["taggings"]):
        date = tuple(_int(r[k], k, where) for k in ("year", "month", "day"))
        rows.append((r["userID"].strip(), r["artistID"].strip(), r["tagID"].strip(), date))

    use = Counter(tag for _, _, tag, _ in rows)
    if not use:  # no tag, so no label set: say so before the task is built
        raise InputError(f"{files['taggings']}: no taggings after the header")
    top = sorted(use, key=lambda t: (-use[t], natural_order(t)))[: opts.top_tags]
    for t in top:
        if not tags.get(t):
            raise InputError(f"{files['tags']}: tag {t} (among the {opts.top_tags} most used) has no name")
    rank = {t: i for i, t in enumerate(top)}

    best: dict[tuple[str, str], tuple] = {}  # (user, artist) -> its most used kept tag's row
    for user, artist, tag, date in rows:
        if tag not in rank:
            report.drop_item("not_top_tag")
        elif artist not in artists:
            report.drop_item("unknown_artist")
        else:
            old = best.get((user, artist))
            if old is not None:
                report.drop_item("duplicate")
            if old is None or rank[tag] < rank[old[0]]:
                best[(user, artist)] = (tag, date)
    records = [Record(user, (*date, natural_order(artist)), f"{user}/{artist}", f"Artist: {artists[artist]}", tags[tag])
               for (user, artist), (tag, date) in best.items()]
    report.records_read = len(rows)
    task = Task(name="lastfm-tags", kind="classification", labels=[tags[t] for t in top], max_new_tokens=8,
                instruction="Which tag does this user give this music artist? Answer with the tag only.",
                input_name="Item", output_name="Tag")
    return build_dataset(task, records, {u for u, *_ in rows}, opts, report)


def _lastfm_files(sources: list[Path]) -> dict[str, Path]:
    """Tell the HetRec files apart by their headers; a folder gives its .dat files."""
    found: dict[str, Path] = {}
    for src in sources:
        for p in sorted(src.glob("*.dat")) if src.is_dir() else [src]:
            cols = set(_header(p, "\t", "latin-1"))
            role = next((r for r, need in _LASTFM.items() if need <= cols), None)
            if role is None:
                if src.is_dir():
                    continue  # user_friends.dat, user_artists.dat, ... are not needed
                raise InputError(f"{p}: header {sorted(cols)} is not artists.dat, tags.dat or user_taggedartists.dat")
            if role in found:
                raise InputError(f"{found[role]} and {p} are both {role} files; pass the one to use")
            found[role] = p
    missing = [f"{r} ({', '.join(sorted(_LASTFM[r]))})" for r in _LASTFM if r not in found]
    if missing:
        raise InputError(f"{', '.join(map(str, sources))}: no file with the columns of {'; '.join(missing)}")
    return found


def papers_jsonl(sources: list[Path], opts: ImportOptions, report: ImportReport | None = None) -> Dataset:
    """Paper metadata JSON lines: per author, abstract -> title (like LaMP-5).

    A paper goes into each of its authors' histories; when records name `profile_authors`, only
    those authors (over the whole file) become users.
    """
    report = report or ImportReport(format="papers-jsonl")
    papers, profile = [], set()
    for path in _exists(sources):
        for where, r in _json_lines(path):
            authors = _field(r, "authors", where)
            if not isinstance(authors, list) or not all(str(a).strip() for a in authors):
                raise InputError(f"{where}: field 'authors': expected a list of author ids (none empty)")
            year = _int(_field(r, "year", where), "year", where)
            profile.update(map(str, r.get("profile_authors") or []))
            report.records_read += 1
            papers.append((r, [str(a) for a in authors], year))
    records = []
    for i, (r, authors, year) in enumerate(papers):
        key = str(r.get("key") or i)
        title, abstract = str(r.get("title") or ""), str(r.get("abstract") or "")
        for a in authors:
            if not profile or a in profile:
                records.append(Record(a, (year, key, title), f"{a}/{key}", abstract, title))
    task = Task(name="papers-titles", kind="generation", max_new_tokens=32,
                instruction="Generate a title for this paper abstract.",
                input_name="Abstract", output_name="Title")
    return build_dataset(task, records, profile or None, opts, report)


def lamp(sources: list[Path], opts: ImportOptions, report: ImportReport | None = None) -> Dataset:
    """LaMP questions (+ outputs) files; the split is LaMP's own, so only the user filters apply."""
    from perpcs.lamp import import_lamp

    if not opts.task:
        raise InputError("format 'lamp' needs --task (a LaMP preset, e.g. LaMP-3)")
    if len(_exists(sources)) not in (1, 2):
        raise InputError(f"format 'lamp' takes questions.json and optionally outputs.json, got {len(sources)} files")
    ds = import_lamp(sources[0], sources[1] if len(sources) == 2 else None, opts.task, n_queries=opts.n_queries)
    return select_users(ds, opts, _count_items(ds, report or ImportReport(format="lamp")))


def perpcs(sources: list[Path], opts: ImportOptions, report: ImportReport | None = None) -> Dataset:
    """The Per-Pcs release's own per-user files."""
    from perpcs.lamp import import_perpcs

    if not opts.task:
        raise InputError("format 'perpcs' needs --task (a LaMP preset, e.g. LaMP-3)")
    if len(_exists(sources)) != 1:
        raise InputError(f"format 'perpcs' takes one file, got {len(sources)}")
    ds = import_perpcs(sources[0], opts.task)
    return select_users(ds, opts, _count_items(ds, report or ImportReport(format="perpcs")))


def _count_items(ds: Dataset, report: ImportReport) -> ImportReport:
    report.records_read = sum(len(u.history) + len(u.queries) for u in ds.users)
    return report


FORMATS: dict[str, Callable[..., Dataset]] = {
    "amazon-reviews": amazon_reviews,
    "annotator-csv": annotator_csv,
    "lastfm-tags": lastfm_tags,
    "papers-jsonl": papers_jsonl,
    "lamp": lamp,
    "perpcs": perpcs,
}


def import_dataset(fmt: str, sources: list[Path], opts: ImportOptions) -> tuple[Dataset, ImportReport]:
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    report = ImportReport(format=fmt)
    ds = FORMATS[fmt]([Path(s) for s in sources], opts, report)
    return ds, report
