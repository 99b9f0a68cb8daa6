import json

import pytest

from perpcs.data import load_dataset, save_dataset
from perpcs.evaluation import write_lamp_outputs
from perpcs.lamp import import_lamp, import_perpcs

P2 = ("Which tag does this movie relate to among the following tags? Just answer with the tag name without "
      "further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, "
      "classic, psychology, fantasy, romance, thought-provoking, social commentary, violence, true story] "
      "description: ")
P3 = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
      "without further explanation. review: ")
P4 = "Generate a headline for the following article: "
P5 = "Generate a title for the following abstract of a paper: "
P7 = "Paraphrase the following tweet without any explanation before or after it: "


def p1(title, r1, r2):
    return (f'For an author who has written the paper with the title "{title}", which reference is related? '
            f'Just answer with [1] or [2] without explanation. [1]: "{r1}" [2]: "{r2}"')


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def pairs(user):
    return [(it.input, it.output) for it in user.history]


def test_lamp2_with_golds_orders_by_date(tmp_path):
    q = write(tmp_path / "q.json", [
        {"id": "110", "input": P2 + "A robot learns to love.", "profile": [
            {"id": "1", "description": "Later film.", "tag": "comedy", "date": "2004-05-01"},
            {"id": "2", "description": "Early film.", "tag": "sci-fi", "date": "1999-12-31"},
        ]},
        {"id": "111", "input": P2 + "A court drama.", "profile": [
            {"id": "3", "description": "War story.", "tag": "true story"}]},
    ])
    g = write_lamp_outputs(tmp_path / "g.json", "LaMP_2", {"110": "romance", "111": "classic"})
    ds = import_lamp(q, g, "LaMP_2")
    assert ds.task.name == "LaMP-2"
    u = ds.user("110")
    assert pairs(u) == [("Early film.", "sci-fi"), ("Later film.", "comedy")]
    assert [(x.id, x.input, x.output) for x in u.queries] == [("110", "A robot learns to love.", "romance")]
    assert ds.user("111").queries[0].input == "A court drama."
    # what it produces is a valid data folder
    assert load_dataset(save_dataset(ds, tmp_path / "out")).users == ds.users


@pytest.mark.parametrize("task, prompt, profile, expect", [
    ("LaMP-3", P3, {"text": "Works well.", "score": 4}, ("Works well.", "4")),
    ("LaMP-4", P4, {"text": "Stocks rose today.", "title": "Stocks Rise"}, ("Stocks rose today.", "Stocks Rise")),
    ("LaMP-5", P5, {"abstract": "We study X.", "title": "On X"}, ("We study X.", "On X")),
    ("LaMP-7", P7, {"text": "so tired today"}, ("so tired today", "so tired today")),
])
def test_lamp_tasks_field_mapping(tmp_path, task, prompt, profile, expect):
    q = write(tmp_path / "q.json", [{"id": "7", "input": prompt + "  the item text ", "profile": [profile]}])
    g = write(tmp_path / "g.json", {"task": task.replace("-", "_"), "golds": [{"id": "7", "output": "3"}]})
    u = import_lamp(q, g, task).users[0]
    assert pairs(u) == [expect]
    assert (u.queries[0].id, u.queries[0].input, u.queries[0].output) == ("7", "the item text", "3")


def test_lamp_without_golds_holds_out_recent_items(tmp_path):
    q = write(tmp_path / "q.json", [{"id": "5", "input": P3 + "unseen", "profile": [
        {"text": f"r{i}", "score": str(i), "date": f"2020-01-0{i}"} for i in (3, 1, 2)]}])
    u = import_lamp(q, None, "LaMP-3", n_queries=1).users[0]
    assert pairs(u) == [("r1", "1"), ("r2", "2")]
    assert [(x.id, x.input, x.output) for x in u.queries] == [("5-h0", "r3", "3")]
    with pytest.raises(ValueError, match="record 0: field 'profile': 3 usable items, too few"):
        import_lamp(q, None, "LaMP-3", n_queries=3)
    everything = import_lamp(q, None, "LaMP-3", n_queries=0).users[0]  # e.g. for base users
    assert len(everything.history) == 3 and everything.queries == []


def test_lamp_golds_plus_held_out(tmp_path):
    q = write(tmp_path / "q.json", [{"id": "5", "input": P4 + "news", "profile": [
        {"text": f"a{i}", "title": f"t{i}"} for i in range(3)]}])
    g = write_lamp_outputs(tmp_path / "g.json", "LaMP_4", {"5": "gold title"})
    u = import_lamp(q, g, "LaMP-4", n_queries=2).users[0]
    assert pairs(u) == [("a0", "t0"), ("a1", "t1")]
    assert [(x.id, x.output) for x in u.queries] == [("5", "gold title"), ("5-h0", "t2")]


def test_lamp1_questions_and_built_history(tmp_path):
    q = write(tmp_path / "q.json", [
        {"id": "1", "input": p1('Deep "nets"', "Ref A", "Ref B"),
         "profile": [{"id": "a", "title": "Paper A1", "abstract": "..."},
                     {"id": "b", "title": "Paper A2", "abstract": "..."}]},
        {"id": "2", "input": p1("Graphs", "Ref C", "Ref D"),
         "profile": [{"id": "c", "title": "Paper B1", "abstract": "..."}]},
    ])
    g = write_lamp_outputs(tmp_path / "g.json", "LaMP_1", {"1": "[2]", "2": "[1]"})
    ds = import_lamp(q, g, "LaMP-1")
    u1 = ds.user("1")
    assert u1.queries[0].input == 'Deep "nets"\n[1]: Ref A\n[2]: Ref B'
    assert u1.queries[0].output == "[2]"
    # each paper asks for the author's other paper against user 2's only paper, in a random slot
    assert len(u1.history) == 2
    for it, (own, other) in zip(u1.history, [("Paper A1", "Paper A2"), ("Paper A2", "Paper A1")]):
        title, ref1, ref2 = it.input.split("\n")
        assert title == own
        right, wrong = (ref1, ref2) if it.output == "[1]" else (ref2, ref1)
        assert (right, wrong) == (f"[{it.output[1]}]: {other}", f"[{3 - int(it.output[1])}]: Paper B1")
    assert ds.user("2").history == []  # one paper: nothing of the same author to relate to
    # reproducible
    assert import_lamp(q, g, "LaMP-1") == ds


def test_lamp1_needs_other_users(tmp_path):
    q = write(tmp_path / "q.json", [{"id": "1", "input": p1("T", "A", "B"),
                                     "profile": [{"title": "x"}, {"title": "y"}]}])
    with pytest.raises(ValueError, match="fewer than two users"):
        import_lamp(q, None, "LaMP-1")


@pytest.mark.parametrize("records, expected", [
    ([{"id": "1", "input": P3 + "x", "profile": [{"text": "t"}]}], r"record 0: profile item 0: field 'score'"),
    ([{"id": "1", "input": P3 + "x", "profile": [{"text": "t", "score": 9}]}], r"profile item 0: field 'score'.*scale"),
    ([{"id": "1", "input": "no marker", "profile": [{"text": "t", "score": 1}]}],
     r"record 0: field 'input': no 'review:'"),
    ([{"id": "1", "input": P3 + "x"}], r"record 0: field 'profile'"),
    ([{"input": P3 + "x", "profile": []}], r"record 0: field 'id'"),
    ([{"id": "1", "input": P3 + "x",
       "profile": [{"text": "t", "score": 1, "date": "2020"}, {"text": "u", "score": 2}]}],
     r"profile item 1: field 'date' missing"),
])
def test_lamp_errors_name_file_record_field(tmp_path, records, expected):
    q = write(tmp_path / "q.json", records)
    g = write_lamp_outputs(tmp_path / "g.json", "LaMP_3", {"1": "3"})
    with pytest.raises(ValueError, match=expected) as e:
        import_lamp(q, g, "LaMP-3")
    assert "q.json" in str(e.value)


def test_lamp_golds_checks(tmp_path):
    q = write(tmp_path / "q.json", [{"id": "1", "input": P3 + "x", "profile": [{"text": "t", "score": 1}]}])
    with pytest.raises(ValueError, match="no gold for question '1'"):
        import_lamp(q, write_lamp_outputs(tmp_path / "g.json", "LaMP_3", {"2": "3"}), "LaMP-3")
    with pytest.raises(ValueError, match="1 golds have no question"):
        import_lamp(q, write_lamp_outputs(tmp_path / "g.json", "LaMP_3", {"1": "3", "2": "3"}), "LaMP-3")
    with pytest.raises(ValueError, match="field 'task'.*LaMP_4"):
        import_lamp(q, write_lamp_outputs(tmp_path / "g.json", "LaMP_4", {"1": "3"}), "LaMP-3")
    with pytest.raises(ValueError, match="unknown task"):
        import_lamp(q, None, "LaMP-9")
    with pytest.raises(ValueError, match="LaMP-7 profiles hold tweets"):
        import_lamp(write(tmp_path / "q7.json", [{"id": "1", "input": P7 + "x", "profile": [{"text": "a"}] * 2}]),
                    None, "LaMP-7")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        import_lamp(tmp_path / "nope.json", None, "LaMP-3")


PERPCS_USERS = [
    {"user_id": 42, "profile": [{"id": "p1", "description": "Old movie.", "tag": "classic"},
                                {"id": "p2", "description": "Space opera.", "tag": "sci-fi"}],
     "query": [{"id": "q1", "input": P2 + "A heist.", "gold": "action"}]},
    {"user_id": "43", "profile": [{"description": "Laughs.", "tag": "comedy"}],
     "query": [{"input": P2 + "Jokes.", "gold": "comedy"}]},
]


@pytest.mark.parametrize("as_lines", [False, True])
def test_perpcs_list_and_json_lines(tmp_path, as_lines):
    path = tmp_path / "users.json"
    path.write_text("\n".join(json.dumps(u) for u in PERPCS_USERS) if as_lines else json.dumps(PERPCS_USERS))
    ds = import_perpcs(path, "LaMP_2M")
    assert [u.user_id for u in ds.users] == ["42", "43"]
    assert pairs(ds.users[0]) == [("Old movie.", "classic"), ("Space opera.", "sci-fi")]
    assert [(x.id, x.input, x.output) for x in ds.users[0].queries] == [("q1", "A heist.", "action")]
    assert [(x.id, x.input, x.output) for x in ds.users[1].queries] == [("43-q0", "Jokes.", "comedy")]


@pytest.mark.parametrize("mutate, expected", [
    (lambda us: us[0].pop("query"), r"record 0: field 'query'"),
    (lambda us: us[1]["query"][0].pop("gold"), r"record 1: query 0: field 'gold'"),
    (lambda us: us[1]["query"][0].update(gold="horror"), r"record 1: query 0: field 'gold'.*not one of"),
    (lambda us: us[1].update(user_id=42), r"record 1: field 'user_id': duplicate"),
    (lambda us: us[1]["query"][0].update(id="q1"), r"query id 'q1' \(user '43'\) is used twice"),
])
def test_perpcs_errors(tmp_path, mutate, expected):
    users = json.loads(json.dumps(PERPCS_USERS))
    mutate(users)
    path = write(tmp_path / "users.json", users)
    with pytest.raises(ValueError, match=expected) as e:
        import_perpcs(path, "LaMP-2")
    assert "users.json" in str(e.value)


def test_perpcs_bad_json_lines(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(PERPCS_USERS[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="u.jsonl: line 2: invalid JSON"):
        import_perpcs(path, "LaMP-2")
