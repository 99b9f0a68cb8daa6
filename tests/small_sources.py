"""Tiny valid source files of every importer format and of the data contract, for the bad-input and
fuzz tests: each test breaks one of them (or its bytes) and checks the error that follows."""

import gzip
import json
from pathlib import Path

from perpcs.records import ImportOptions

P3 = "What is the score of this review? review: "


def _jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# format -> {file name: bytes}; importing them with OPTS gives 2 users
SOURCES: dict[str, dict[str, bytes]] = {
    "amazon-reviews": {"reviews.json": _jsonl(
        [{"reviewerID": u, "asin": f"p{i}", "unixReviewTime": i, "overall": 1 + (i + j) % 5,
          "reviewText": f"review {u} {i}"} for j, u in enumerate("AB") for i in range(3)])},
    "annotator-csv": {
        "texts.csv": b"text_id,text\n1,hello there\n2,a world\n3,some foo\n",
        "ann.csv": b"text_id,annotator_id,valence\n1,a,1\n2,a,2\n3,a,0\n1,b,-1\n2,b,0\n3,b,3\n"},
    "lastfm-tags": {
        "artists.dat": b"id\tname\n1\tX\n2\tY\n3\tZ\n",
        "tags.dat": b"tagID\ttagValue\n1\trock\n2\tpop\n",
        "user_taggedartists.dat": b"userID\tartistID\ttagID\tday\tmonth\tyear\n" + b"".join(
            f"{u}\t{a}\t{1 + (u + a) % 2}\t1\t1\t{2000 + a}\n".encode() for u in (1, 2) for a in (1, 2, 3))},
    "papers-jsonl": {"papers.jsonl": _jsonl(
        [{"key": f"k{i}", "year": 2000 + i, "authors": ["a", "b"], "title": f"Title {i}", "abstract": f"Abstract {i}"}
         for i in range(3)])},
    "lamp": {
        "questions.json": json.dumps([{"id": str(q), "input": P3 + f"query {q}",
                                       "profile": [{"text": f"old {q} {k}", "score": 1 + k} for k in range(3)]}
                                      for q in (1, 2)]).encode(),
        "outputs.json": json.dumps({"task": "LaMP_3", "golds": [{"id": "1", "output": "3"},
                                                                {"id": "2", "output": "5"}]}).encode()},
    "perpcs": {"users.json": json.dumps([{"user_id": u,
                                          "profile": [{"text": f"old {u} {k}", "score": 1 + k} for k in range(3)],
                                          "query": [{"id": f"{u}q", "input": P3 + f"query {u}", "gold": "4"}]}
                                         for u in ("u1", "u2")]).encode()},
}

OPTS = ImportOptions(min_history=1, n_queries=1, task="LaMP-3")


def write_sources(fmt: str, folder: Path, files: dict[str, bytes] | None = None, gz: set[str] = frozenset()
                  ) -> list[Path]:
    """Write a format's files (or the given ones) into `folder`; names in `gz` gzip-compressed."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in (files or SOURCES[fmt]).items():
        path = folder / (name + ".gz" if name in gz else name)
        path.write_bytes(gzip.compress(data, mtime=0) if name in gz else data)
        paths.append(path)
    return paths


TASK = {"name": "t", "kind": "classification", "labels": ["sci-fi", "comedy"], "instruction": "Tag it."}
USERS = [{"user_id": f"u{i}", "history": [{"input": f"movie {i} {k}", "output": "comedy"} for k in range(2)],
          "queries": [{"id": f"q{i}", "input": f"movie {i} new", "output": "sci-fi"}]} for i in range(2)]


def data_folder(folder: Path, task: dict | bytes = TASK, users: list | bytes = USERS) -> Path:
    """A data-contract folder; `task`/`users` given as bytes are written as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_bytes(task if isinstance(task, bytes) else json.dumps(task).encode())
    (folder / "users.jsonl").write_bytes(users if isinstance(users, bytes) else _jsonl(users))
    return folder
