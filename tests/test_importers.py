"""Importers read small files in each data set's original format; users, histories and queries are checked exactly."""

import csv
import gzip
import json
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perpcs.cli import app
from perpcs.data import Dataset, Item, Query, User, load_dataset
from perpcs.errors import InputError
from perpcs.importers import import_dataset
from perpcs.records import ImportOptions, clip
from perpcs.tasks import get_task

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def opts(**kw) -> ImportOptions:
    return ImportOptions(**{"min_history": 1, **kw})


def hist(user: User) -> list[tuple[str, str]]:
    return [(it.input, it.output) for it in user.history]


def qs(user: User) -> list[tuple[str, str, str]]:
    return [(q.id, q.input, q.output) for q in user.queries]


def no_query_in_history(ds: Dataset) -> bool:
    return all(not {q.input for q in u.queries} & {it.input for it in u.history} for u in ds.users)


# ---------------------------------------------------------------- amazon-reviews


def review(user, asin, text, stars, time, summary="s"):
    return {"reviewerID": user, "asin": asin, "reviewText": text, "summary": summary, "overall": stars,
            "unixReviewTime": time, "verified": True}


@pytest.fixture
def amazon(tmp_path):
    rows = [
        review("A", "p3", "third  review", 3.0, 300, "Meh"),
        review("A", "p1", "first review", 5.0, 100, "Great"),
        review("A", "p2", "first review", 5.0, 100, "Great"),  # same text, other variant: duplicate
        review("A", "p4", "fourth review", 1.0, 400, "Bad"),
        review("A", "p0", "second review", 4.0, 200, "Good"),
        review("B", "p9", "b two", 2.0, 50, "Two"),
        review("B", "p8", "b one", 4.0, 50, "One"),  # same time: asin p8 < p9 comes first
        review("B", "p7", "b three", 5.0, 60, ""),
        {"reviewerID": "C", "asin": "p1", "overall": 5.0, "unixReviewTime": 1},  # no reviewText
        review("D", "p1", "only one", 5.0, 1),
    ]
    return write_jsonl(tmp_path / "Beauty_5.json.gz", rows)


def test_amazon_rating_dedup_order_split(amazon):
    ds, rep = import_dataset("amazon-reviews", [amazon], opts())
    assert ds.task.kind == "rating" and ds.task.scale == (1, 5) and ds.task.name == "amazon-Beauty_5-rating"
    a, b = ds.users
    assert a.user_id == "A" and b.user_id == "B"
    assert hist(a) == [("first review", "5"), ("second review", "4"), ("third review", "3")]
    assert qs(a) == [("A/p4", "fourth review", "1")]
    assert hist(b) == [("b one", "4"), ("b two", "2")]
    assert qs(b) == [("B/p7", "b three", "5")]
    assert rep.records_read == 10 and rep.items_dropped == {"duplicate": 1, "no_text": 1}
    assert rep.users_found == 4 and rep.users_kept == 2
    assert rep.users_dropped == {"no_usable_items": 1, "too_few_items": 1}
    assert rep.history_items == 5 and rep.queries == 2
    assert no_query_in_history(ds)


def test_amazon_title_drops_empty_summary_and_min_history(amazon):
    ds, rep = import_dataset("amazon-reviews", [amazon], opts(target="title", min_history=0, n_queries=2))
    assert ds.task.kind == "generation"
    a, b = ds.users
    assert hist(a) == [("first review", "Great"), ("second review", "Good")]
    assert [q.output for q in a.queries] == ["Meh", "Bad"]
    assert hist(b) == [] and qs(b) == [("B/p8", "b one", "One"), ("B/p9", "b two", "Two")]
    assert rep.items_dropped == {"duplicate": 1, "no_text": 1, "no_output": 1}
    assert rep.users_dropped == {"no_usable_items": 1, "too_few_items": 1}  # D: 1 item, not 2 queries
    # B has 2 items, fewer than 2 history + 2 queries; with only A left the import fails
    with pytest.raises(ValueError, match=r"only 1 usable user\(s\) of 4 found.*too_few_items=2"):
        import_dataset("amazon-reviews", [amazon], opts(target="title", min_history=2, n_queries=2))


def test_amazon_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "x.json.gz"
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps(review("A", "p", "t", 5, 1)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"x\.json\.gz: line 2: invalid JSON"):
        import_dataset("amazon-reviews", [bad], opts())
    row = review("A", "p", "t", 5, 1)
    del row["overall"]
    path = write_jsonl(tmp_path / "y.json", [review("A", "p", "t", 5, 1), row])
    with pytest.raises(ValueError, match=r"y\.json: line 2: missing field 'overall'"):
        import_dataset("amazon-reviews", [path], opts())
    # two different reviews of one product by one reviewer keep distinct query ids
    two = write_jsonl(tmp_path / "z.json", [review(u, "p", f"{u} {i}", 5, i) for u in "AB" for i in range(3)])
    ds, _ = import_dataset("amazon-reviews", [two], opts(n_queries=2))
    assert [q.id for q in ds.users[0].queries] == ["A/p#2", "A/p#3"]
    with pytest.raises(FileNotFoundError, match="nope.json"):
        import_dataset("amazon-reviews", [tmp_path / "nope.json"], opts())
    with pytest.raises(ValueError, match="unknown format 'amazon'"):
        import_dataset("amazon", [path], opts())


def test_clip_and_max_users(tmp_path):
    assert clip(" a  b\n c d ", 3) == "a b c" and clip("a\tb", None) == "a b"
    rows = [review(u, f"p{i}", f"{u} {i} " + "word " * 300, 5, i)
            for u, n in (("x", 3), ("y", 4), ("w", 4), ("z", 2)) for i in range(n)]
    path = write_jsonl(tmp_path / "r.json", rows)
    ds, rep = import_dataset("amazon-reviews", [path], opts(max_users=2))
    assert [u.user_id for u in ds.users] == ["w", "y"]  # the most active; ties by id
    assert rep.users_dropped == {"max_users": 2}
    assert ds.users[0].queries[0].input == "w 3 " + " ".join(["word"] * 254)  # 256 words by default
    ds, _ = import_dataset("amazon-reviews", [path], opts(max_users=3, max_tokens=2))
    assert [u.user_id for u in ds.users] == ["w", "x", "y"]  # x (3 items) beats z (2)
    assert hist(ds.users[1]) == [("x 0", "5"), ("x 1", "5")]
    # clipped to one word, a user's items are all the same text: duplicates of the oldest
    with pytest.raises(ValueError, match=r"duplicate=9"):
        import_dataset("amazon-reviews", [path], opts(max_tokens=1))


# ---------------------------------------------------------------- annotator-csv


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    f = gzip.open(path, "wt", newline="", encoding="utf-8") if path.suffix == ".gz" else open(path, "w", newline="")
    with f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def studemo(tmp_path):
    texts = write_csv(tmp_path / "text_data.csv.gz", ["text_id", "text"],
                      [[i, f"text number {i}, with a comma\nand a line"] for i in range(6)])
    header = ["text_id", "annotator_id", "joy", "valence", "arousal"]
    rows = [[t, a, 1.0, (t - 3) * (1 if a == 1 else -1), 2.0] for a in (1, 2) for t in range(6)]
    rows += [[0, 3, 1.0, "", 1.0]]  # annotator 3 left valence empty
    return [write_csv(tmp_path / "annotation_data.csv", header, rows), texts]  # order does not matter


def test_annotator_csv_rating(studemo):
    ds, rep = import_dataset("annotator-csv", studemo, opts(n_queries=2))
    assert ds.task.kind == "rating" and ds.task.scale == (-3, 3) and ds.task.output_name == "Valence"
    assert [u.user_id for u in ds.users] == ["1", "2"]
    for u, sign in zip(ds.users, (1, -1)):
        items = hist(u) + [(q.input, q.output) for q in u.queries]
        assert len(u.history) == 4 and len(u.queries) == 2
        # every text once, with this annotator's own valence
        assert sorted(items) == sorted((f"text number {t}, with a comma and a line", str((t - 3) * sign))
                                       for t in range(6))
        assert all(q.id == f"{u.user_id}/{q.input.split()[2].rstrip(',')}" for q in u.queries)
    assert rep.users_dropped == {"no_usable_items": 1} and rep.items_dropped == {"no_output": 1}
    # the order is a seeded shuffle: same seed, same split; another seed, another order
    again, _ = import_dataset("annotator-csv", list(reversed(studemo)), opts(n_queries=2))
    assert again == ds
    other, _ = import_dataset("annotator-csv", studemo, opts(n_queries=2, seed=1))
    assert [hist(u) for u in other.users] != [hist(u) for u in ds.users]


def test_annotator_csv_classification_and_errors(studemo, tmp_path):
    ds, _ = import_dataset("annotator-csv", studemo, opts(kind="classification", label="arousal"))
    assert ds.task.labels == ["1", "2"] and len(ds.users) == 2  # annotator 3 has one item only
    with pytest.raises(ValueError, match="no column 'anger'"):
        import_dataset("annotator-csv", studemo, opts(label="anger"))
    with pytest.raises(ValueError, match="single value 1"):
        import_dataset("annotator-csv", studemo, opts(label="joy"))
    bad = write_csv(tmp_path / "ann.csv", ["text_id", "annotator_id", "valence"], [[0, 1, 1], ["", 1, 2]])
    with pytest.raises(ValueError, match=r"ann\.csv: line 3: missing field 'text_id'"):
        import_dataset("annotator-csv", [studemo[1], bad], opts())
    bad = write_csv(tmp_path / "ann.csv", ["text_id", "annotator_id", "valence"], [[0, 1, "high"]])
    with pytest.raises(ValueError, match=r"ann\.csv: line 2: field 'valence': 'high' is not a number"):
        import_dataset("annotator-csv", [studemo[1], bad], opts())
    bad = write_csv(tmp_path / "ann.csv", ["text_id", "annotator_id", "valence"], [[99, 1, 1]])
    with pytest.raises(ValueError, match=r"ann\.csv: line 2: field 'text_id': '99' is not in"):
        import_dataset("annotator-csv", [studemo[1], bad], opts())
    with pytest.raises(ValueError, match="both texts tables"):
        import_dataset("annotator-csv", [studemo[1], studemo[1]], opts())


# ---------------------------------------------------------------- lastfm-tags


def write_dat(path: Path, header: list[str], rows: list[list], encoding: str = "utf-8") -> Path:
    lines = ["\t".join(map(str, r)) for r in [header] + rows]
    path.write_bytes("".join(line + "\r\n" for line in lines).encode(encoding))
    return path


@pytest.fixture
def lastfm(tmp_path):
    write_dat(tmp_path / "artists.dat", ["id", "name", "url", "pictureURL"],
              [[i, f'Band "{i}" Café', f"http://x/{i}", ""] for i in range(1, 8)])
    write_dat(tmp_path / "tags.dat", ["tagID", "tagValue"],
              [[1, "rock"], [2, "pop"], [3, "métal"], [4, "rare"]], encoding="latin-1")
    write_dat(tmp_path / "user_friends.dat", ["userID", "friendID"], [[1, 2]])
    # tag use: rock 5, pop 4, métal 3, rare 2 -> top 3 = rock, pop, métal
    rows = [
        [10, 1, 2, 1, 1, 2009], [10, 1, 1, 1, 1, 2009],  # artist 1: pop and rock -> rock (most used)
        [10, 2, 3, 5, 3, 2008],
        [10, 3, 4, 1, 1, 2010],  # rare: not a top tag
        [10, 4, 1, 2, 1, 2009],
        [10, 5, 2, 1, 6, 2009],
        [10, 99, 1, 1, 1, 2009],  # unknown artist
        [20, 1, 1, 1, 1, 2007], [20, 2, 1, 1, 1, 2007], [20, 6, 2, 1, 1, 2007],
        [20, 7, 3, 1, 1, 2006], [20, 3, 3, 9, 9, 2011], [20, 4, 2, 1, 1, 2011],
        [30, 1, 4, 1, 1, 2009],  # only a rare tag
    ]
    write_dat(tmp_path / "user_taggedartists.dat", ["userID", "artistID", "tagID", "day", "month", "year"], rows)
    return tmp_path


def test_lastfm_tags(lastfm):
    ds, rep = import_dataset("lastfm-tags", [lastfm], opts(top_tags=3))
    assert ds.task.kind == "classification" and ds.task.labels == ["rock", "pop", "métal"]
    u10, u20 = ds.users
    assert hist(u10) == [('Artist: Band "2" Café', "métal"), ('Artist: Band "1" Café', "rock"),
                         ('Artist: Band "4" Café', "rock")]
    assert qs(u10) == [("10/5", 'Artist: Band "5" Café', "pop")]
    assert [i[14] for i, _ in hist(u20)] == ["7", "1", "2", "6", "4"]  # by date, then artist id
    assert [o for _, o in hist(u20)] == ["métal", "rock", "rock", "pop", "pop"]
    assert qs(u20) == [("20/3", 'Artist: Band "3" Café', "métal")]
    assert rep.records_read == 14 and rep.users_found == 3 and rep.users_dropped == {"no_usable_items": 1}
    assert rep.items_dropped == {"not_top_tag": 2, "unknown_artist": 1, "duplicate": 1}
    assert no_query_in_history(ds)
    # the files instead of the folder give the same; a label set of one tag keeps rock only
    files = [lastfm / n for n in ("tags.dat", "artists.dat", "user_taggedartists.dat")]
    assert import_dataset("lastfm-tags", files, opts(top_tags=3))[0] == ds
    ds1, _ = import_dataset("lastfm-tags", files, opts(top_tags=1))
    assert {it.output for u in ds1.users for it in u.history} == {"rock"}


def test_lastfm_errors(lastfm):
    with pytest.raises(ValueError, match="no file with the columns of tags"):
        import_dataset("lastfm-tags", [lastfm / "artists.dat", lastfm / "user_taggedartists.dat"], opts())
    with pytest.raises(ValueError, match=r"user_friends\.dat: header .* is not artists\.dat"):
        import_dataset("lastfm-tags", [lastfm / "user_friends.dat"], opts())
    with open(lastfm / "user_taggedartists.dat", "ab") as f:
        f.write(b"10\t1\t1\t1\tjan\t2009\r\n")
    with pytest.raises(ValueError, match=r"user_taggedartists\.dat: line 16: field 'month': 'jan' is not an integer"):
        import_dataset("lastfm-tags", [lastfm], opts())
    # a taggings file with its header only: no label set, said before the task is built (hypothesis found it)
    write_dat(lastfm / "user_taggedartists.dat", ["userID", "artistID", "tagID", "day", "month", "year"], [])
    with pytest.raises(InputError, match=r"user_taggedartists\.dat: no taggings after the header"):
        import_dataset("lastfm-tags", [lastfm], opts())


# ---------------------------------------------------------------- papers-jsonl


def paper(key, year, authors, profile=None, title=None, abstract=None):
    row = {"key": key, "title": title or f"Title {key}", "abstract": abstract or f"Abstract of {key}.",
           "authors": authors, "year": str(year)}
    if profile:
        row["profile_authors"] = profile
    return row


def test_papers_jsonl(tmp_path):
    rows = [
        paper("k3", 2020, ["ann", "bob", "cy"], ["ann"]),
        paper("k1", 2018, ["ann", "bob"], ["bob"]),
        paper("k2", 2018, ["ann"], ["ann"]),
        paper("k0", 2019, ["bob", "ann"], ["bob"], abstract="Abstract of k1."),  # bob's copy of k1: duplicate
        paper("k4", 2021, ["bob"], ["bob"]),
        paper("k5", 2022, ["cy"]),
    ]
    path = write_jsonl(tmp_path / "papers.jsonl.gz", rows)
    ds, rep = import_dataset("papers-jsonl", [path], opts())
    assert [u.user_id for u in ds.users] == ["ann", "bob"]  # cy is never a profile author
    ann, bob = ds.users
    assert hist(ann) == [("Abstract of k1.", "Title k1"), ("Abstract of k2.", "Title k2")]  # 2018: k1 < k2
    assert qs(ann) == [("ann/k3", "Abstract of k3.", "Title k3")]
    assert hist(bob) == [("Abstract of k1.", "Title k1"), ("Abstract of k3.", "Title k3")]
    assert qs(bob) == [("bob/k4", "Abstract of k4.", "Title k4")]
    assert rep.records_read == 6 and rep.items_dropped == {"duplicate": 2}  # k0 for ann and for bob
    # without profile_authors every author is a user
    plain = [{k: v for k, v in r.items() if k != "profile_authors"} for r in rows]
    ds, rep = import_dataset("papers-jsonl", [write_jsonl(tmp_path / "p.jsonl", plain)], opts())
    assert rep.users_found == 3 and [u.user_id for u in ds.users] == ["ann", "bob", "cy"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:2] + [{"title": "t", "abstract": "a", "authors": "ann"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: field 'authors': expected a list"):
        import_dataset("papers-jsonl", [bad], opts())


# ---------------------------------------------------------------- lamp / perpcs dispatch, CLI


def test_lamp_dispatch_filters_users(monkeypatch, tmp_path):
    """`lamp` hands the files to perpcs.lamp.import_lamp (faked here), then applies the user filters."""
    calls = []

    def fake(questions, outputs, task, n_queries=1):
        calls.append((questions, outputs, task, n_queries))
        return Dataset(task=get_task(task), users=[
            User(user_id=str(i), history=[Item(input=f"r{j}", output="3") for j in range(i)],
                 queries=[Query(id=f"q{i}", input="q", output="4")]) for i in range(4)])

    monkeypatch.setitem(sys.modules, "perpcs.lamp", types.SimpleNamespace(import_lamp=fake))
    q = tmp_path / "questions.json"
    q.write_text("[]")
    ds, rep = import_dataset("lamp", [q], ImportOptions(task="LaMP-3", min_history=2))
    assert calls == [(q, None, "LaMP-3", 1)]
    assert [u.user_id for u in ds.users] == ["2", "3"] and rep.users_dropped == {"too_few_items": 2}
    assert rep.records_read == 10
    with pytest.raises(ValueError, match="needs --task"):
        import_dataset("lamp", [q], ImportOptions())


def test_cli_import_writes_contract(amazon, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["data", "import", "amazon-reviews", str(amazon), "--out", str(out),
                                   "--min-history", "1"])
    assert res.exit_code == 0, res.output
    assert '"users_kept": 2' in res.output
    ds = load_dataset(out)
    assert [u.user_id for u in ds.users] == ["A", "B"] and ds.task.name == "amazon-Beauty_5-rating"
    res = CliRunner().invoke(app, ["data", "import", "amazon-reviews", str(amazon), "--out", str(out)])
    assert res.exit_code == 2 and "already holds files this command does not replace" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["data", "import", "amazon-reviews", str(amazon), "--out", str(out), "--force"])
    assert res.exit_code == 2 and "only 0 usable user(s)" in res.output
    assert [u.user_id for u in load_dataset(out).users] == ["A", "B"]  # a failed import writes nothing
    res = CliRunner().invoke(app, ["data", "import", "amazon-reviews", str(amazon), "--out", str(tmp_path / "o2"),
                                   "--target", "stars"])
    assert res.exit_code == 2 and "target" in res.output


# ---------------------------------------------------------------- real data (skipped when absent)

REAL_IMPORTS = [
    ("amazon-reviews", ["amazon-reviews-2018/All_Beauty_5.json.gz"], {"min_history": 3}),
    ("annotator-csv", ["studemo/annotation_data.csv", "studemo/text_data.csv.gz"], {}),
    ("lastfm-tags", ["lastfm-hetrec2011"], {}),
    ("papers-jsonl", ["mlanthology/mlanthology_subset_300authors.jsonl.gz"], {}),
]


@pytest.mark.parametrize("fmt,files,kw", REAL_IMPORTS, ids=[f for f, _, _ in REAL_IMPORTS])
def test_real_data(fmt, files, kw, tmp_path):
    if not REAL.is_dir():
        pytest.skip(f"{REAL} is absent")
    ds, rep = import_dataset(fmt, [REAL / f for f in files], ImportOptions(max_users=10, **kw))
    assert len(ds.users) == rep.users_kept == 10
    assert all(len(u.history) >= kw.get("min_history", 5) and len(u.queries) == 1 for u in ds.users)
    assert no_query_in_history(ds)
    assert all(len(it.input.split()) <= 256 for u in ds.users for it in u.history)
    assert load_dataset(ds_folder(ds, tmp_path)) == ds  # the task accepts every output


def ds_folder(ds: Dataset, tmp_path: Path) -> Path:
    from perpcs.data import save_dataset

    return save_dataset(ds, tmp_path / "ds")
