"""Dataset loaders: each layout on small hand-made files, the two splits, fingerprints across layouts,
error locations for malformed files, and the real Games folder."""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from core.data import DataError, RecDataset, detect_format, load_dataset
from core.data import precheck as precheck_module
from core.data.dealrec_layout import load_dealrec_layout
from core.data.interactions import load_interaction_log
from core.data.precheck import check_utf8, precheck
from core.data.recbole import load_recbole
from core.data.tables import delimited_field_at, read_text

GAMES = Path(__file__).resolve().parents[1].parent / "shared/datasets/games"

Files = dict[str, "str | bytes | None | Callable[[Path], None]"]


def write_files(folder: Path, base: Files, overrides: Files | None = None) -> Path:
    """Write `base` updated by `overrides` into `folder`: text, bytes, a writer callable, or None (omit)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in {**base, **(overrides or {})}.items():
        if content is None:
            continue
        if callable(content):
            content(folder / name)
        elif isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content, encoding="utf-8", newline="")
    return folder


def parquet_writer(columns: dict[str, list]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)
    return write


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def parts(ds: RecDataset) -> tuple:
    return ds.user_ids, ds.train, ds.valid, ds.test


# ---------------------------------------------------------------------------------------------------
# DEALRec layout

DEALREC: Files = {
    "items.tsv": 'item_id\tsource_item_id\ttitle\n1\tA1\tAlpha\n2\tB2\t"Beta ""Deluxe"""\n'
                 "3\tC3\t  Gamma  \n4\tD4\tDelta\n5\tE5\tEpsilon\n",
    "users.tsv": "user_id\tsource_user_id\n1\tU1\n2\tU2\n3\tU3\n",
    "sequential_train.txt": "1 1 2 3\n2 2\n3 1\n",
    "sequential_valid.txt": "1 4\n2\n3\n",
    "sequential_test.txt": "1 5\n2 3\n3\n",
}
DEALREC_TITLES = ("Alpha", 'Beta "Deluxe"', "Gamma", "Delta", "Epsilon")
DEALREC_PARTS = (("U1", "U2", "U3"), ((1, 2, 3), (2,), (1,)), ((4,), (), ()), ((5,), (3,), ()))


def test_dealrec_layout_loads_users_items_and_parts(tmp_path: Path) -> None:
    ds = load_dealrec_layout(write_files(tmp_path, DEALREC))
    assert ds.item_ids == ("A1", "B2", "C3", "D4", "E5")
    assert ds.item_titles == DEALREC_TITLES
    assert parts(ds) == DEALREC_PARTS
    assert (ds.history(0), ds.target(0)) == ((1, 2), 3)


def test_dealrec_layout_without_users_file_uses_numeric_ids(tmp_path: Path) -> None:
    ds = load_dealrec_layout(write_files(tmp_path, DEALREC, {"users.tsv": None}))
    assert ds.user_ids == ("1", "2", "3")


def test_dealrec_layout_renumbers_sparse_item_ids_in_id_order(tmp_path: Path) -> None:
    ds = load_dealrec_layout(write_files(tmp_path, DEALREC, {
        "items.tsv": "item_id\tsource_item_id\ttitle\n30\tC\tGamma\n10\tA\tAlpha\n20\tB\tBeta\n",
        "sequential_train.txt": "1 10 30\n2 20\n3 10\n",
        "sequential_valid.txt": "1 20\n2\n3\n",
        "sequential_test.txt": "1\n2 30\n3\n",
    }))
    assert ds.item_ids == ("A", "B", "C")
    assert ds.train == ((1, 3), (2,), (1,))
    assert ds.valid == ((2,), (), ())
    assert ds.test == ((), (3,), ())


# ---------------------------------------------------------------------------------------------------
# Interaction logs: the two splits on one known log

LOG_ROWS = [  # user, item, timestamp; row order matters for ties (rows 5 and 6, rows 10 and 11 by user)
    ("u1", "i1", 1), ("u2", "i2", 2), ("u1", "i3", 3), ("u3", "i1", 10), ("u2", "i4", 4),
    ("u1", "i2", 5), ("u2", "i1", 5), ("u4", "i5", 6), ("u1", "i4", 7), ("u2", "i3", 8),
    ("u5", "i6", 0.5), ("u5", "i2", 9),
]
ITEM_ROWS = [("i1", "One"), ("i2", "Two"), ("i3", "Three"), ("i4", "Four"), ("i5", "Five"),
             ("i6", "Six"), ("i7", "Never seen")]
# 12 interactions: 9 train, 1 valid, 2 test; u3's only interaction is the last (test): no training sample,
# kept after the users with one.
CHRONO = (("u1", "u2", "u4", "u5", "u3"), ((1, 3, 2, 4), (2, 4, 1), (5,), (6,), ()), ((), (3,), (), (), ()),
          ((), (), (), (2,), (1,)))
LOO = (("u1", "u2", "u3", "u4", "u5"), ((1, 3), (2, 4), (1,), (5,), (6,)), ((2,), (1,), (), (), ()),
       ((4,), (3,), (), (), (2,)))


def log_files(fmt: str) -> Files:
    """The known log and its items table, both in format `fmt`."""
    log_cols = {"user_id": [r[0] for r in LOG_ROWS], "item_id": [r[1] for r in LOG_ROWS],
                "timestamp": [float(r[2]) for r in LOG_ROWS], "rating": [4.0] * len(LOG_ROWS)}
    item_cols = {"item_id": [r[0] for r in ITEM_ROWS], "title": [r[1] for r in ITEM_ROWS]}
    if fmt == "parquet":
        return {"interactions.parquet": parquet_writer(log_cols), "items.parquet": parquet_writer(item_cols)}
    if fmt == "jsonl":
        return {"interactions.jsonl": jsonl([dict(zip(log_cols, v)) for v in zip(*log_cols.values())]),
                "items.jsonl": jsonl([dict(zip(item_cols, v)) for v in zip(*item_cols.values())])}
    sep = "," if fmt == "csv" else "\t"
    log_text = f"user_id{sep}item_id{sep}rating{sep}timestamp\n" + "".join(
        f"{u}{sep}{i}{sep}4{sep}{t}\n" for u, i, t in LOG_ROWS)
    items_text = f"item_id{sep}title\n" + "".join(f"{i}{sep}{t}\n" for i, t in ITEM_ROWS)
    return {f"interactions.{fmt}": log_text, f"items.{fmt}": items_text}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
@pytest.mark.parametrize("split, expected", [("chrono", CHRONO), ("loo", LOO)])
def test_interaction_log_splits(tmp_path: Path, fmt: str, split: str, expected: tuple) -> None:
    folder = write_files(tmp_path, log_files(fmt))
    ds = load_interaction_log(folder / f"interactions.{fmt}", folder / f"items.{fmt}", split=split)
    assert parts(ds) == expected
    assert ds.item_ids == tuple(r[0] for r in ITEM_ROWS)  # table order, unseen item kept
    assert ds.item_titles == tuple(r[1] for r in ITEM_ROWS)
    assert load_dataset(folder, split=split).fingerprint == ds.fingerprint


def test_same_log_in_every_format_has_one_fingerprint(tmp_path: Path) -> None:
    prints = {load_dataset(write_files(tmp_path / fmt, log_files(fmt))).fingerprint
              for fmt in ("csv", "tsv", "jsonl", "parquet")}
    assert len(prints) == 1


def test_iso_timestamps_order_like_numbers(tmp_path: Path) -> None:
    """ISO-8601 strings (with Z, offsets, or naive = UTC) order like the epoch seconds they denote."""
    rows = [{"user_id": 1, "item_id": "a", "timestamp": "2020-01-01T00:00:10Z"},
            {"user_id": 1, "item_id": "b", "timestamp": "2020-01-01T01:00:05+01:00"},  # 00:00:05Z
            {"user_id": 1, "item_id": "c", "timestamp": 1577836815},  # 00:00:15Z
            {"user_id": "1", "item_id": "d", "timestamp": "2020-01-01 00:00:20"}]
    folder = write_files(tmp_path, {"interactions.jsonl": jsonl(rows),
                                    "items.csv": "item_id,title\na,A\nb,B\nc,C\nd,D\n"})
    ds = load_dataset(folder, split="loo")
    assert parts(ds) == (("1",), ((2, 1),), ((3,),), ((4,),))


def test_titles_are_cleaned_and_multiline_records_keep_physical_line_numbers(tmp_path: Path) -> None:
    items = 'item_id,title\ni1," Two\nLines\there "\ni1,Again\n'
    folder = write_files(tmp_path, {"interactions.csv": "user_id,item_id,timestamp\nu,i1,1\n",
                                    "items.csv": items})
    with pytest.raises(DataError) as info:
        load_dataset(folder)
    assert (info.value.line, info.value.field) == (4, "item_id")
    (folder / "items.csv").write_text(items.replace("i1,Again", "i2,Again"), encoding="utf-8")
    assert load_dataset(folder, split="loo").item_titles == ("Two Lines here", "Again")


def test_chrono_split_that_leaves_no_sample_is_refused(tmp_path: Path) -> None:
    folder = write_files(tmp_path, {"interactions.csv": "user_id,item_id,timestamp\nu,i1,1\n",
                                    "items.csv": "item_id,title\ni1,One\n"})
    with pytest.raises(DataError, match="no user has a training interaction"):
        load_dataset(folder, split="chrono")
    assert load_dataset(folder, split="loo").train == ((1,),)


# ---------------------------------------------------------------------------------------------------
# RecBole

RECBOLE_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"{u}\t{i}\t4\t{t}\n" for u, i, t in LOG_ROWS)


@pytest.mark.parametrize("title_header", ["title:token_seq", "title:token", "movie_title:token_seq"])
def test_recbole_matches_the_equivalent_interaction_log(tmp_path: Path, title_header: str) -> None:
    item_text = f"item_id:token\t{title_header}\tyear:token\n" + "".join(
        f"{i}\t{t}\t1999\n" for i, t in ITEM_ROWS)
    folder = write_files(tmp_path / "toy", {"toy.inter": RECBOLE_INTER, "toy.item": item_text})
    reference = write_files(tmp_path / "log", log_files("csv"))
    for split, expected in (("chrono", CHRONO), ("loo", LOO)):
        ds = load_recbole(folder, split=split)
        assert parts(ds) == expected
        assert ds.fingerprint == load_dataset(reference, split=split).fingerprint
    assert load_recbole(folder / "toy.inter").fingerprint == load_recbole(folder).fingerprint


# ---------------------------------------------------------------------------------------------------
# Fingerprints across layouts

def dealrec_as_loo_log() -> Files:
    """DEALREC written as an interaction log whose leave-one-out split gives back the same parts."""
    rows = [("U1", "A1", 1), ("U1", "B2", 2), ("U2", "B2", 3), ("U1", "C3", 4), ("U3", "A1", 5),
            ("U1", "D4", 6), ("U2", "C3", 7), ("U1", "E5", 8)]
    items = [("A1", "Alpha"), ("B2", '"Beta ""Deluxe"""'), ("C3", "Gamma"), ("D4", "Delta"),
             ("E5", "Epsilon")]
    return {"interactions.csv": "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows),
            "items.csv": "item_id,title\n" + "".join(f"{i},{t}\n" for i, t in items)}


def test_fingerprint_is_the_same_across_layouts_only_for_identical_content(tmp_path: Path) -> None:
    layout = load_dataset(write_files(tmp_path / "dealrec", DEALREC))
    assert layout.fingerprint == load_dataset(tmp_path / "dealrec").fingerprint  # stable
    log_folder = write_files(tmp_path / "log", dealrec_as_loo_log())
    as_log = load_dataset(log_folder, split="loo")
    assert parts(as_log) == DEALREC_PARTS
    assert as_log.fingerprint == layout.fingerprint

    (log_folder / "items.csv").write_text((log_folder / "items.csv").read_text().replace("Gamma", "Gamma 2"))
    assert load_dataset(log_folder, split="loo").fingerprint != layout.fingerprint
    assert load_dataset(log_folder, split="chrono").fingerprint != as_log.fingerprint


# ---------------------------------------------------------------------------------------------------
# Detection and load_dataset

def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(write_files(tmp_path / "d", DEALREC)) == "dealrec"
    assert detect_format(write_files(tmp_path / "i", log_files("tsv"))) == "interactions"
    assert detect_format(tmp_path / "i" / "interactions.tsv") == "interactions"
    rec = write_files(tmp_path / "r", {"r.inter": RECBOLE_INTER, "r.item": "item_id:token\ttitle:token\n"})
    assert detect_format(rec) == "recbole"
    assert detect_format(rec / "r.inter") == "recbole"


def test_unknown_or_missing_path_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(DataError) as info:
            load_dataset(path)
        message = str(info.value)
        assert path.name in message
        assert all(part in message for part in ("sequential_train.txt", ".inter", "interactions.", "items."))


def test_folder_with_two_layouts_must_be_named(tmp_path: Path) -> None:
    # the log shares items.tsv (item_id, title, plus a column it ignores) with the DEALRec files
    folder = write_files(tmp_path, DEALREC, {"interactions.csv": "user_id,item_id,timestamp\nu,1,1\nu,2,2\n"})
    with pytest.raises(DataError, match="several dataset layouts"):
        load_dataset(folder)
    assert parts(load_dataset(folder, fmt="interactions")) == (("u",), ((1,),), ((),), ((2,),))
    assert load_dataset(folder, fmt="dealrec").item_titles == DEALREC_TITLES


def test_load_dataset_arguments(tmp_path: Path) -> None:
    folder = write_files(tmp_path, DEALREC)
    assert parts(load_dataset(folder, limit_users=2)) == tuple(p[:2] for p in DEALREC_PARTS)
    with pytest.raises(ValueError, match="already split"):
        load_dataset(folder, split="loo")
    with pytest.raises(ValueError):
        load_dataset(folder, limit_users=0)
    with pytest.raises(ValueError):
        load_dataset(folder, fmt="csv")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Malformed inputs: every error names the file, the line (Parquet: row) and the field

LOG_CSV = log_files("csv")
RECBOLE = {"r.inter": RECBOLE_INTER,
           "r.item": "item_id:token\ttitle:token_seq\n" + "".join(f"{i}\t{t}\n" for i, t in ITEM_ROWS)}
CSV_LOG_HEAD = "user_id,item_id,rating,timestamp\n"


def items_parquet_with_bad_utf8(path: Path) -> None:
    """A string column whose second value is not UTF-8 (pyarrow checks nothing when viewing bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    item_ids = pa.array([b"i1", b"\xff"]).view(pa.string())
    pq.write_table(pa.table({"item_id": item_ids, "title": ["a", "b"]}), path)


BAD_INPUTS = [
    # id, base files, overrides, (file, "line N" / "row N", field)
    ("dealrec-missing-column", DEALREC, {"items.tsv": "item_id\tsource_item_id\tname\n1\tA\tx\n"},
     ("items.tsv", "line 1", "title")),
    ("dealrec-non-numeric-item", DEALREC, {"sequential_train.txt": "1 1 2 3\n2 x\n3 1\n"},
     ("sequential_train.txt", "line 2", "item_id")),
    ("dealrec-non-numeric-user", DEALREC, {"sequential_valid.txt": "1 4\n2\nu3\n"},
     ("sequential_valid.txt", "line 3", "user_id")),
    ("dealrec-non-numeric-item-id-in-items", DEALREC,
     {"items.tsv": "item_id\tsource_item_id\ttitle\nx\tA\tt\n"},
     ("items.tsv", "line 2", "item_id")),
    ("dealrec-unknown-item", DEALREC, {"sequential_test.txt": "1 5\n2 9\n3\n"},
     ("sequential_test.txt", "line 2", "item_id")),
    ("dealrec-empty-file", DEALREC, {"sequential_train.txt": ""},
     ("sequential_train.txt", "line 1", "user_id")),
    ("dealrec-empty-items", DEALREC, {"items.tsv": ""}, ("items.tsv", "line 1", "item_id")),
    ("dealrec-non-utf8", DEALREC, {"items.tsv": DEALREC["items.tsv"].encode().replace(b"Beta", b"B\xffta")},
     ("items.tsv", "line 3", "title")),
    ("dealrec-non-utf8-sequence", DEALREC, {"sequential_train.txt": b"1 1 2 3\n2 2\xa0\n3 1\n"},
     ("sequential_train.txt", "line 2", "item_id")),
    ("dealrec-user-order-valid", DEALREC, {"sequential_valid.txt": "1 4\n3\n2\n"},
     ("sequential_valid.txt", "line 2", "user_id")),
    ("dealrec-missing-valid-line", DEALREC, {"sequential_valid.txt": "1 4\n2\n"},
     ("sequential_valid.txt", "line 3", "user_id")),
    ("dealrec-blank-line", DEALREC, {"sequential_test.txt": "1 5\n\n2 3\n3\n"},
     ("sequential_test.txt", "line 2", "user_id")),
    ("dealrec-no-training-item-at-all", DEALREC, {"sequential_train.txt": "1\n2\n3\n"},
     ("sequential_train.txt", "line 1", "item_id")),
    ("dealrec-duplicate-item", DEALREC, {"items.tsv": DEALREC["items.tsv"].replace("4\tD4", "2\tD4")},
     ("items.tsv", "line 5", "item_id")),
    ("dealrec-empty-title", DEALREC, {"items.tsv": DEALREC["items.tsv"].replace("Epsilon", "  ")},
     ("items.tsv", "line 6", "title")),
    ("dealrec-user-not-in-users", DEALREC, {"users.tsv": "user_id\tsource_user_id\n1\tU1\n2\tU2\n"},
     ("sequential_train.txt", "line 3", "user_id")),
    ("log-missing-column", LOG_CSV, {"interactions.csv": "user_id,item_id\nu1,i1\n"},
     ("interactions.csv", "line 1", "timestamp")),
    ("log-non-numeric-rating", LOG_CSV, {"interactions.csv": CSV_LOG_HEAD + "u1,i1,4,1\nu1,i2,good,2\n"},
     ("interactions.csv", "line 3", "rating")),
    ("log-unknown-item", LOG_CSV, {"interactions.csv": CSV_LOG_HEAD + "u1,i1,4,1\nu1,i2,4,2\nu1,i99,4,3\n"},
     ("interactions.csv", "line 4", "item_id")),
    ("log-empty-file", LOG_CSV, {"interactions.csv": ""}, ("interactions.csv", "line 1", "user_id")),
    ("log-header-only", LOG_CSV, {"interactions.csv": CSV_LOG_HEAD},
     ("interactions.csv", "line 2", "user_id")),
    ("log-non-utf8", LOG_CSV,
     {"interactions.csv": (CSV_LOG_HEAD + "u1,i1,4,1\nu\xe9,i2,4,2\n").encode("latin-1")},
     ("interactions.csv", "line 3", "user_id")),
    ("log-bad-timestamp", LOG_CSV,
     {"interactions.csv": CSV_LOG_HEAD + "u1,i1,4,1\nu1,i2,4,1\nu2,i3,4,later\n"},
     ("interactions.csv", "line 4", "timestamp")),
    ("log-earliest-bad-row-wins", LOG_CSV,
     {"interactions.csv": CSV_LOG_HEAD + "u1,i1,4,1\nu1,i2,4,x\nu1,i99,4,3\n"},
     ("interactions.csv", "line 3", "timestamp")),
    ("log-short-row", LOG_CSV, {"interactions.csv": CSV_LOG_HEAD + "u1,i1,4,1\nu1,i2,4\n"},
     ("interactions.csv", "line 3", "timestamp")),
    ("log-duplicate-item", LOG_CSV, {"items.csv": "item_id,title\ni1,One\ni2,Two\ni1,Again\n"},
     ("items.csv", "line 4", "item_id")),
    ("log-empty-title", LOG_CSV, {"items.csv": "item_id,title\ni1,One\ni2,\n"},
     ("items.csv", "line 3", "title")),
    ("tsv-unknown-item", {"items.tsv": "item_id\ttitle\ni1\tOne\n",
                          "interactions.tsv": "user_id\titem_id\ttimestamp\nu\ti1\t1\nu\ti2\t2\n"}, {},
     ("interactions.tsv", "line 3", "item_id")),
    ("jsonl-bad-timestamp", LOG_CSV, {"interactions.csv": None, "interactions.jsonl": jsonl([
        {"user_id": "u", "item_id": "i1", "timestamp": 1},
        {"user_id": "u", "item_id": "i2", "timestamp": "soon"}])},
     ("interactions.jsonl", "line 2", "timestamp")),
    ("jsonl-missing-key", LOG_CSV, {"interactions.csv": None, "interactions.jsonl": jsonl([
        {"user_id": "u", "item_id": "i1", "timestamp": 1}, {"user_id": "u", "item_id": "i2"}])},
     ("interactions.jsonl", "line 2", "timestamp")),
    ("jsonl-non-utf8", LOG_CSV, {"interactions.csv": None, "interactions.jsonl":
                                 b'{"user_id": "u", "item_id": "i1", "timestamp": 1}\n'
                                 b'{"user_id": "u", "item_id": "i\xff2", "timestamp": 2}\n'},
     ("interactions.jsonl", "line 2", "item_id")),
    ("parquet-bad-timestamp", LOG_CSV, {"interactions.csv": None, "interactions.parquet": parquet_writer(
        {"user_id": ["u", "u"], "item_id": ["i1", "i2"], "timestamp": ["1", "noon"]})},
     ("interactions.parquet", "row 2", "timestamp")),
    ("parquet-duplicate-item", LOG_CSV, {"items.csv": None, "items.parquet": parquet_writer(
        {"item_id": [1, 2, 1], "title": ["a", "b", "c"]})}, ("items.parquet", "row 3", "item_id")),
    ("parquet-non-utf8", LOG_CSV, {"items.csv": None, "items.parquet": items_parquet_with_bad_utf8},
     ("items.parquet", "row 2", "item_id")),
    ("parquet-missing-column", LOG_CSV, {"interactions.csv": None, "interactions.parquet": parquet_writer(
        {"user_id": ["u"], "item_id": ["i1"]})}, ("interactions.parquet", "", "timestamp")),
    ("recbole-missing-column", RECBOLE, {"r.inter": "user_id:token\titem_id:token\nu1\ti1\n"},
     ("r.inter", "line 1", "timestamp")),
    ("recbole-no-title", RECBOLE, {"r.item": "item_id:token\tyear:token\ni1\t1999\n"},
     ("r.item", "line 1", "title")),
    ("recbole-unknown-item", RECBOLE, {"r.inter": RECBOLE_INTER.replace("i3", "i33", 1)},
     ("r.inter", "line 4", "item_id")),
    ("recbole-bad-timestamp", RECBOLE, {"r.inter": RECBOLE_INTER.replace("\t4\t1\n", "\t4\tx\n", 1)},
     ("r.inter", "line 2", "timestamp")),
    ("recbole-duplicate-item", RECBOLE, {"r.item": RECBOLE["r.item"].replace("i2\t", "i1\t")},
     ("r.item", "line 3", "item_id")),
    ("recbole-empty-title", RECBOLE, {"r.item": RECBOLE["r.item"].replace("Five", "")},
     ("r.item", "line 6", "title")),
]


@pytest.mark.parametrize("base, overrides, expected", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_malformed_input_is_a_data_error_naming_file_line_and_field(
        tmp_path: Path, base: Files, overrides: Files, expected: tuple[str, str, str]) -> None:
    file_name, where, field = expected
    folder = write_files(tmp_path, base, overrides)
    with pytest.raises(DataError) as info:
        load_dataset(folder)
    error, message = info.value, str(info.value)
    assert Path(error.file).name == file_name, message
    assert error.field == field, message
    assert file_name in message and f"'{field}'" in message and where in message, message
    if where.startswith("line "):
        assert error.line == int(where.split()[1]), message
    else:
        assert error.line is None, message


# ---------------------------------------------------------------------------------------------------
# Precheck: the cheap encoding and header checks raise only what the full load raises

def where(error: DataError) -> tuple:
    return Path(error.file).name, error.line, error.field


def reason(error: DataError) -> str:
    """The message without pyarrow's own words (they differ between its table and footer readers)."""
    return error.reason.split(": ", 1)[0] if error.reason.startswith("not a readable Parquet") else error.reason


# Problems in the first line of a file, which the precheck must find (id, base, overrides, must find)
FIRST_LINE_INPUTS = [
    ("dealrec-valid-first-user-differs", DEALREC, {"sequential_valid.txt": "2\n1 4\n3\n"}),
    ("dealrec-blank-first-line", DEALREC, {"sequential_test.txt": "\n1 5\n2 3\n3\n"}),
    ("dealrec-blank-file", DEALREC, {"sequential_test.txt": "\n \n\n"}),
    ("dealrec-users-header", DEALREC, {"users.tsv": "user_id\tname\n1\tU1\n2\tU2\n3\tU3\n"}),
    ("dealrec-missing-valid-file", DEALREC, {"sequential_valid.txt": None}),
    ("log-duplicate-column", LOG_CSV, {"items.csv": "item_id,title,title\ni1,a,b\n"}),
    ("log-bad-quote-in-header", LOG_CSV, {"items.csv": 'item_id,"title\ni1,a\n'}),
    ("jsonl-first-line-not-json", LOG_CSV, {"interactions.csv": None, "interactions.jsonl": "{nope\n"}),
    ("jsonl-first-line-missing-key", LOG_CSV, {"interactions.csv": None, "interactions.jsonl": jsonl([
        {"user_id": "u", "item_id": "i1"}])}),
    ("jsonl-blank", LOG_CSV, {"interactions.csv": None, "interactions.jsonl": "\n\n"}),
    ("parquet-unreadable", LOG_CSV, {"items.csv": None, "items.parquet": b"not parquet"}),
    ("parquet-no-rows", LOG_CSV, {"items.csv": None, "items.parquet": parquet_writer({"item_id": [], "title": []})}),
    ("bom-and-bad-byte-in-header", LOG_CSV, {"items.csv": codecs.BOM_UTF8 + b"item_id,ti\xfftle\ni1,a\n"}),
    ("cut-off-character-at-end", DEALREC, {"sequential_test.txt": b"1 5\n2 3\n3\xe2\x82"}),
]
MUST_PRECHECK = {case[0] for case in FIRST_LINE_INPUTS} | {
    "dealrec-missing-column", "dealrec-empty-file", "dealrec-empty-items", "dealrec-non-utf8",
    "dealrec-non-utf8-sequence", "log-missing-column", "log-empty-file", "log-non-utf8", "jsonl-non-utf8",
    "parquet-missing-column", "recbole-missing-column", "recbole-no-title"}
PRECHECK_INPUTS = [case[:3] for case in BAD_INPUTS] + FIRST_LINE_INPUTS


@pytest.mark.parametrize("name, base, overrides", PRECHECK_INPUTS, ids=[case[0] for case in PRECHECK_INPUTS])
def test_precheck_raises_only_what_the_loader_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                                     base: Files, overrides: Files) -> None:
    folder = write_files(tmp_path, base, overrides)
    with pytest.raises(DataError) as loaded:
        load_dataset(folder)
    try:
        precheck(folder)
    except DataError as exc:
        assert (where(exc), reason(exc)) == (where(loaded.value), reason(loaded.value))
    else:
        assert name not in MUST_PRECHECK, f"precheck missed: {loaded.value}"
    # Tiny read limits and chunks (headers cut off, characters split across chunks): the precheck may
    # then see less (a bad byte's field needs the header line), but never refuses anything else.
    monkeypatch.setattr(precheck_module, "CHUNK", 3)
    for head_bytes in (1, 7, 24):
        monkeypatch.setattr(precheck_module, "HEAD_BYTES", head_bytes)
        try:
            precheck(folder)
        except DataError as exc:
            assert (where(exc)[:2], reason(exc)) == (where(loaded.value)[:2], reason(loaded.value))
            assert exc.field in (loaded.value.field, None)


VALID_LAYOUTS = [("dealrec", DEALREC), ("recbole", RECBOLE)] + [
    ("interactions", log_files(fmt)) for fmt in ("csv", "tsv", "jsonl", "parquet")] + [
    ("interactions", {name: text.replace("\n", "\r\n") for name, text in log_files("csv").items()}),
    ("interactions", {**LOG_CSV, "items.csv": codecs.BOM_UTF8 + b'"item_id","title"\n\n"i1","a, b"\n' +
                      "".join(f"{i},{t}\n" for i, t in ITEM_ROWS[1:]).encode()}),
    ("dealrec", {**DEALREC, "README.txt": "caf\u00e9 \u20ac \U0001d11e\n", "sequential_test.txt": "1 5\n2 3\n3\n\n\n"}),
    ("dealrec", {**DEALREC, "sequential_train.txt": "1\n2 2\n3 1\n"}),  # user 1 without a training sample
]


@pytest.mark.parametrize("fmt, files", VALID_LAYOUTS)
def test_precheck_passes_every_valid_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str,
                                            files: Files) -> None:
    folder = write_files(tmp_path, files)
    assert load_dataset(folder).n_users > 0
    assert precheck(folder) == fmt
    monkeypatch.setattr(precheck_module, "CHUNK", 2)
    for head_bytes in (1, 5, 16, 40):
        monkeypatch.setattr(precheck_module, "HEAD_BYTES", head_bytes)
        assert precheck(folder) == fmt


def test_precheck_leaves_a_header_past_its_read_limit_to_the_loader(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_files(tmp_path, DEALREC, {"items.tsv": "item_id\tsource_item_id\tname\n1\tA\tx\n"})
    monkeypatch.setattr(precheck_module, "HEAD_BYTES", 16)
    assert precheck(folder) == "dealrec"
    with pytest.raises(DataError, match="missing column 'title'"):
        load_dataset(folder)


def test_precheck_refuses_non_utf8_in_any_text_file(tmp_path: Path) -> None:
    # The loader never reads notes.txt; the precheck still refuses it (an upload holds data files only).
    folder = write_files(tmp_path, DEALREC, {"notes.txt": b"ok\nd\xe9j\xe0 vu\n"})
    with pytest.raises(DataError) as info:
        precheck(folder)
    assert where(info.value) == ("notes.txt", 2, None)
    assert "byte 0xe9 at column 2" in str(info.value)


def test_precheck_needs_a_folder_with_a_known_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        precheck(write_files(tmp_path, DEALREC) / "items.tsv")
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="no dataset layout recognised"):
        precheck(tmp_path / "other")


def test_utf8_scan_locates_the_loaders_byte_across_chunk_boundaries(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Random text, one random corruption (a stray continuation byte, 0xff, a character cut short, an
    overlong form), scanned in chunks of 1-7 bytes: the same error as the loader's whole-file decode."""
    rng = random.Random(0)
    pieces = ["a", "7", "\t", "\n", "\r\n", "\u00e9", "\u20ac", "\U0001d11e", " "]
    corruptions = [b"\x80", b"\xff", b"\xe2\x82", b"\xc0\xaf", b"\xf0\x9d\x84"]
    field_at = delimited_field_at("\t")
    path = tmp_path / "t.tsv"
    for trial in range(300):
        data = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))).encode()
        if trial % 5:
            at = rng.randint(0, len(data))
            while at < len(data) and 0x80 <= data[at] < 0xC0:  # not inside a character
                at += 1
            data = data[:at] + rng.choice(corruptions) + data[at:]
        path.write_bytes((codecs.BOM_UTF8 if trial % 7 == 0 else b"") + data)
        monkeypatch.setattr(precheck_module, "CHUNK", 1 + trial % 7)
        try:
            read_text(path, field_at)
            expected = None
        except DataError as exc:
            expected = (where(exc), str(exc))
        try:
            check_utf8(path, field_at)
            found = None
        except DataError as exc:
            found = (where(exc), str(exc))
        assert found == expected, (trial, data)


@pytest.mark.games
def test_games_folder_passes_the_precheck() -> None:
    if not GAMES.is_dir():
        pytest.skip(f"the Games dataset is not at {GAMES} (it lives in ../shared, beside the project)")
    assert precheck(GAMES) == "dealrec"


# ---------------------------------------------------------------------------------------------------
# The real Games data


@pytest.mark.games
def test_games_folder() -> None:
    if not GAMES.is_dir():
        pytest.skip(f"the Games dataset is not at {GAMES} (it lives in ../shared, beside the project)")
    assert detect_format(GAMES) == "dealrec"
    ds = load_dataset(GAMES)
    assert (ds.n_users, ds.n_items) == (49_156, 17_332)
    assert sum(1 for items in ds.test if items) == 8_696
    assert all(ds.train)
    limited = load_dataset(GAMES, limit_users=1000)
    assert limited.n_users == 1000 and limited.n_items == ds.n_items
    assert limited.train == ds.train[:1000]


def test_data_error_for_client_names_files_relative_and_hides_server_paths(tmp_path):
    root = tmp_path / "upload"
    (root / "sub").mkdir(parents=True)
    inside = root / "sub" / "items.parquet"
    exc = DataError(f"Could not open Parquet input source '{inside}': bad footer", file=inside, line=3, field="title")
    assert exc.for_client(root) == {"file": "sub/items.parquet", "line": 3, "field": "title",
                                    "message": "Could not open Parquet input source 'sub/items.parquet': bad footer"}
    assert DataError("x", file=tmp_path / "elsewhere.csv").for_client(root)["file"] == "elsewhere.csv"
    assert DataError("x", file=root).for_client(root)["file"] is None
    # a message clipped in the middle of the server's folder keeps none of it
    for cut in (5, len(str(root)) // 2, len(str(root)) - 1):
        long = DataError("x" * (1000 - cut) + f"{inside} is bad", file=inside).for_client(root)["message"]
        assert str(root)[:2] not in long[:long.rindex("...")] and long.endswith("characters)")

    # A real unreadable Parquet file: whatever pyarrow says, the server's folder is not in it.
    (root / "interactions.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    (root / "items.csv").write_text("item_id,title\n1,Zelda\n")
    with pytest.raises(DataError) as info:
        load_dataset(root)
    public = info.value.for_client(root)
    assert public["file"] == "interactions.parquet"
    assert str(tmp_path) not in json.dumps(public)


# ---------------------------------------------------------------------------------------------------
# Users without a training sample (an empty training line; a chrono split that leaves a user only
# validation / test items): loaded, placed after the users with a sample, counted, evaluated where
# their history allows

NO_SAMPLE_DEALREC: Files = {**DEALREC, "users.tsv": "user_id\tsource_user_id\n1\tU1\n2\tU2\n3\tU3\n4\tU4\n5\tU5\n",
                            "sequential_train.txt": "1 1 2 3\n2\n3 1\n4\n5 2\n",
                            "sequential_valid.txt": "1 4\n2 2\n3\n4\n5\n",
                            "sequential_test.txt": "1 5\n2 3\n3\n4 1\n5 4\n"}


def test_dealrec_layout_keeps_users_with_an_empty_training_line(tmp_path: Path) -> None:
    folder = write_files(tmp_path, NO_SAMPLE_DEALREC)
    assert precheck(folder) == "dealrec"
    ds = load_dataset(folder)
    # U2 (validation and test items) and U4 (a test item only) come after the users with a sample.
    assert parts(ds) == (("U1", "U3", "U5", "U2", "U4"), ((1, 2, 3), (1,), (2,), (), ()),
                         ((4,), (), (), (2,), ()), ((5,), (), (4,), (3,), (1,)))
    assert (ds.n_users, ds.n_samples, ds.no_sample_after) == (5, 3, (1, 2))
    assert ds.evaluable_without_sample() == 1  # U2: its validation item is the history of its test item
    with pytest.raises(ValueError, match="no training sample"):
        ds.history(3)
    stats = ds.statistics()
    assert (stats["users"], stats["samples"], stats["users_without_training_sample"]) == (5, 3, 2)
    assert stats["mean_train_length"] == round(5 / 3, 3)
    assert len(stats["notes"]) == 1 and "2 of 5 users have no training sample" in stats["notes"][0]
    # limit_users counts users with a sample and keeps those without one that come before the last kept
    limited = ds.limit_users(2)
    assert (limited.user_ids, limited.no_sample_after, limited.n_samples) == (("U1", "U3", "U2"), (1,), 2)
    assert ds.limit_users(1).user_ids == ("U1",) and ds.limit_users(3) is ds
    # the data without those users' lines is other data: another fingerprint
    without = write_files(tmp_path / "without", DEALREC)
    assert load_dataset(without).fingerprint != ds.fingerprint
    assert load_dataset(without).statistics()["users_without_training_sample"] == 0
    assert load_dataset(without).statistics()["notes"] == []


def test_interaction_log_keeps_users_whose_interactions_all_came_late(tmp_path: Path) -> None:
    ds = load_dataset(write_files(tmp_path, log_files("csv")), split="chrono")
    assert (ds.n_samples, ds.n_users, ds.user_ids[ds.n_samples:], ds.no_sample_after) == (4, 5, ("u3",), (2,))
    stats = ds.statistics()
    assert (stats["samples"], stats["users_without_training_sample"]) == (4, 1)
    assert ds.evaluable_without_sample() == 0  # u3 has a test item but no history before it
    assert ds.limit_users(2).user_ids == ("u1", "u2")
    assert ds.limit_users(3).user_ids == ("u1", "u2", "u4", "u3")


def test_dataset_refuses_users_without_a_sample_in_the_middle() -> None:
    with pytest.raises(ValueError, match="must come last"):
        RecDataset(user_ids=("a", "b"), item_ids=("i",), item_titles=("I",), train=((), (1,)), valid=((), ()),
                   test=((), ()), no_sample_after=(0,))


# ---------------------------------------------------------------------------------------------------
# Values too long to quote, lines too long to read

def test_errors_quote_long_values_clipped_with_their_length(tmp_path: Path) -> None:
    long_id = "x" * 300_000
    folder = write_files(tmp_path, DEALREC, {"sequential_train.txt": f"1 1 2 3\n{long_id} 2\n3 1\n"})
    with pytest.raises(DataError) as info:
        load_dataset(folder)
    message = str(info.value)
    assert len(message) < 600 and "300,000 characters" in message and info.value.line == 2
    digits = "9" * 5000  # digits, but no id (int() refuses more than 4,300 digits)
    write_files(tmp_path, DEALREC, {"sequential_train.txt": f"1 1 2 3\n{digits} 2\n3 1\n"})
    with pytest.raises(DataError, match="5,000 characters"):
        load_dataset(folder)


@pytest.mark.parametrize("position", ["first", "later"])
def test_a_line_longer_than_the_loaders_read_is_refused(tmp_path: Path, position: str) -> None:
    long_line = "u1," + "a" * (1 << 20) + ",1\n"
    # later: a row on line 3; first: the header line itself
    log = "user_id,item_id,timestamp\nu1,i1,1\n" + long_line if position == "later" else long_line
    folder = write_files(tmp_path, {"interactions.csv": log,
                                    "items.csv": "item_id,title\ni1,One\n"})
    with pytest.raises(DataError, match="longer than 1,048,576 bytes") as loaded:
        load_dataset(folder)
    assert loaded.value.line == (3 if position == "later" else 1)
    if position == "first":
        with pytest.raises(DataError, match="longer than") as checked:
            precheck(folder)
        assert where(checked.value) == where(loaded.value)
    else:
        assert precheck(folder) == "interactions"
