"""benchmarks/bench_report.py: JSON results → docs/benchmarks.md.

The inputs are synthetic documents with random values; every assertion compares the
markdown with those inputs, so no expected number is written here.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from tests.helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


br = benchmark_module("bench_report")


def _doc(rng: random.Random, n_tables: int = 2, n_runs: int = 1) -> dict:
    def table(k: int) -> dict:
        cols = ["name", *(f"col{c}-{rng.randrange(1000)}" for c in range(rng.randint(1, 4)))]
        rows = [[f"row{r}-{rng.randrange(1000)}",
                 *(round(rng.uniform(0.01, 999), 3) if c % 2 else rng.randrange(1, 10 ** 6)
                   for c in range(len(cols) - 1))] for r in range(rng.randint(1, 5))]
        return {"title": f"table {k} {rng.randrange(10 ** 6)}", "columns": cols, "rows": rows,
                "note": f"note {rng.randrange(10 ** 6)}"}

    runs = [{"machine": {"cpu": f"CPU model {rng.randrange(10 ** 6)}",
                         "isa": rng.choice(["AVX2", "AVX512", "DEFAULT"]),
                         "torch": f"2.{rng.randrange(20)}.{rng.randrange(5)}",
                         "threads": rng.randint(1, 64), "date": f"2000-01-{rng.randint(10, 28)}"},
             "tables": [table(k) for k in range(n_tables)]} for _ in range(n_runs)]
    return {"title": f"Benchmark {rng.randrange(10 ** 6)}",
            "command": f"python benchmarks/x.py --n {rng.randrange(100)}", "runs": runs}


def _write(folder: Path, name: str, doc: object) -> Path:
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_has_every_title_machine_and_cell_from_the_input(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    docs = {"b_second.json": _doc(rng, n_runs=2), "a_first.json": _doc(rng, n_tables=3)}
    for name, doc in docs.items():
        _write(tmp_path, name, doc)
    out = tmp_path / "report.md"
    assert br.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    md = out.read_text()
    assert md.startswith("# Benchmark report")
    assert br.COMMAND in md.split("\n\n")[1]  # the header names the generating command
    # files in name order
    assert md.index(docs["a_first.json"]["title"]) < md.index(docs["b_second.json"]["title"])
    for doc in docs.values():
        assert f"## {doc['title']}" in md
        assert f"Command: `{doc['command']}`" in md
        for run in doc["runs"]:
            m = run["machine"]
            for value in (m["cpu"], m["isa"], f"torch {m['torch']}",
                          f"torch threads: {m['threads']}", m["date"]):
                assert value in md
            for table in run["tables"]:
                assert f" {table['title']}\n" in md
                assert "| " + " | ".join(table["columns"]) + " |" in md
                assert table["note"] in md
                for row in table["rows"]:
                    assert "| " + " | ".join(br.format_cell(c) for c in row) + " |" in md
    n_tables = sum(len(r["tables"]) for d in docs.values() for r in d["runs"])
    assert md.count("\n|---") == n_tables + 1  # + the index table of the results files


def test_numbers_are_rendered_from_their_values():
    rng = random.Random(7)
    for _ in range(50):
        x = rng.uniform(-1e3, 1e3)
        assert float(br.format_cell(x)) == pytest.approx(x, rel=5e-4)  # 4 significant digits
        n = rng.randrange(10 ** 9)
        assert br.format_cell(n) == str(n)
    assert br.format_cell("a|b") == "a\\|b"  # a cell cannot split its row


def test_numeric_columns_are_right_aligned():
    table = {"title": "t", "columns": ["name", "ms", "mixed"], "note": "",
             "rows": [["x", 1.5, 2], ["y", 3, "n/a"]]}
    rule = br.render_table(table).splitlines()[3]
    assert rule == "|---|---:|---|"


def test_readme_block_is_regenerated(tmp_path: Path):
    rng = random.Random(3)
    doc = _doc(rng, n_tables=2)
    _write(tmp_path, "bench.json", doc)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table: bench 1 -->\nstale numbers\n"
                      "<!-- bench-table: end -->\noutro\n")
    assert br.main(["--results", str(tmp_path), "--out", str(tmp_path / "r.md"),
                    "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale numbers" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    table = doc["runs"][0]["tables"][1]
    assert table["title"] in text and doc["command"] in text
    assert doc["runs"][0]["machine"]["cpu"] in text
    for row in table["rows"]:
        assert "| " + " | ".join(br.format_cell(c) for c in row) + " |" in text
    assert doc["runs"][0]["tables"][0]["title"] not in text


def test_readme_block_naming_a_missing_file_is_an_error(tmp_path: Path):
    _write(tmp_path, "bench.json", _doc(random.Random(4)))
    with pytest.raises(br.ReportError, match="nope.json"):
        br.update_readme("<!-- bench-table: nope 0 -->\n<!-- bench-table: end -->\n",
                         {"bench": br.load(tmp_path / "bench.json")})


def _broken_docs() -> list[tuple[str, object, str]]:
    good = _doc(random.Random(5))
    cases: list[tuple[str, object, str]] = [("top level is a list", [good], "top level")]

    def broken(label: str, edit, match: str) -> None:
        d = copy.deepcopy(good)
        edit(d)
        cases.append((label, d, match))

    broken("no title", lambda d: d.pop("title"), '"title"')
    broken("no runs", lambda d: d.update(runs=[]), '"runs"')
    broken("threads as text", lambda d: d["runs"][0]["machine"].update(threads="2"),
           r'runs\[0\]\.machine: "threads"')
    broken("threads as bool", lambda d: d["runs"][0]["machine"].update(threads=True),
           '"threads"')
    broken("no isa", lambda d: d["runs"][0]["machine"].pop("isa"), '"isa"')
    broken("short row", lambda d: d["runs"][0]["tables"][1]["rows"][0].pop(),
           r"tables\[1\]\.rows\[0\]")
    broken("null cell", lambda d: d["runs"][0]["tables"][0]["rows"][0].__setitem__(1, None),
           "strings or numbers")
    broken("no note", lambda d: d["runs"][0]["tables"][0].pop("note"), '"note"')
    broken("no tables", lambda d: d["runs"][0].update(tables=[]), '"tables"')
    broken("available as text", lambda d: d["runs"][0]["machine"].update(available="no"),
           '"available"')
    return cases


BROKEN = _broken_docs()


@pytest.mark.parametrize("label,doc,match", BROKEN, ids=[c[0] for c in BROKEN])
def test_malformed_json_is_a_clear_error(tmp_path: Path, capsys, label: str, doc: object,
                                         match: str):
    path = _write(tmp_path, "bad.json", doc)
    with pytest.raises(br.ReportError, match=match) as err:
        br.load(path)
    assert str(path) in str(err.value)
    out = tmp_path / "report.md"
    assert br.main(["--results", str(tmp_path), "--out", str(out)]) == 1
    assert "bad.json" in capsys.readouterr().err
    assert not out.exists()  # nothing half-written


def test_invalid_json_text_and_empty_folder(tmp_path: Path, capsys):
    assert br.main(["--results", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 1
    assert "no *.json" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(br.ReportError, match="not valid JSON"):
        br.load(tmp_path / "x.json")


def test_write_results_refuses_what_the_report_could_not_read(tmp_path: Path):
    doc = _doc(random.Random(6))
    doc["runs"][0]["machine"]["threads"] = 1.5
    with pytest.raises(br.ReportError, match="threads"):
        br.write_results(tmp_path / "x.json", doc["title"], doc["command"], doc["runs"])
    assert not (tmp_path / "x.json").exists()


def test_machine_entry_follows_the_schema():
    m = br.machine()
    br.validate({"title": "t", "command": "c", "runs": [
        {"machine": m, "tables": [{"title": "t", "columns": ["a"], "rows": [], "note": ""}]}]},
        "machine()")


def test_sgd_wd_report_tables_follow_the_schema_and_carry_the_timings():
    cases = benchmark_module("sgd_wd_cases")
    report = benchmark_module("report")
    rng = random.Random(8)
    case = cases.tiny_case()
    fake = {k: cases.Timing(k, [rng.uniform(1e-4, 1e-2) for _ in range(5)], 1)
            for k in cases.VARIANTS}
    res = cases.CaseResult(case, fake)
    gbps = rng.uniform(5, 50)
    table = report.case_table(res, gbps, "cold", "setting")
    br.validate({"title": "t", "command": "c",
                 "runs": [{"machine": br.machine(), "tables": [table]}]}, "case_table")
    assert [row[0] for row in table["rows"]] == [cases.VARIANTS[k] for k in fake]
    floor = cases.floor_seconds(case, gbps)
    for row, t in zip(table["rows"], fake.values()):
        assert row[1] == pytest.approx(t.median * 1e3, abs=5e-4)  # rounded to µs
        assert row[3] == pytest.approx(fake[cases.REF_NORMS].median / t.median, abs=5e-3)
        assert row[-1] == pytest.approx(t.median / floor, abs=5e-3)
    assert "time / triad floor" not in report.case_table(res, None, "x")["columns"]
    target = cases.Target("a target", rng.uniform(0, 3), 2.0, True)
    tt = report.targets_table({"cold": [target], "warm": [target]}, "note")
    assert tt["rows"][0][0] == "a target"
    assert tt["rows"][0][2] == round(target.value, 2)
    assert tt["rows"][0][3] == ("PASS" if target.value >= 2.0 else "FAIL")


def test_a_run_of_an_unavailable_isa_is_reported_without_tables(tmp_path: Path):
    rng = random.Random(9)
    doc = _doc(rng, n_runs=2)
    missing = doc["runs"][1]
    missing["machine"]["available"] = False
    missing["tables"] = []
    _write(tmp_path, "isa.json", doc)
    out = tmp_path / "r.md"
    assert br.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    md = out.read_text()
    assert f"Not run: this CPU does not support {missing['machine']['isa']}." in md
    for table in doc["runs"][0]["tables"]:
        assert f" {table['title']}\n" in md


def test_index_links_reach_repeated_titles(tmp_path: Path):
    rng = random.Random(10)
    first, second = _doc(rng), _doc(rng)
    second["title"] = first["title"]
    _write(tmp_path, "a.json", first)
    _write(tmp_path, "b.json", second)
    md = br.render([("a.json", br.load(tmp_path / "a.json")),
                    ("b.json", br.load(tmp_path / "b.json"))])
    base = br.anchor(first["title"])
    assert f"](#{base})" in md and f"](#{base}-1)" in md
