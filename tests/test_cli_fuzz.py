"""Every command-line entry point against arbitrary flags and cluster files: it exits 0 or 2
(one line saying what is wrong) within a bound, never with a traceback or a hang, and starts no
rank for a bad flag (bench and train stop at a stand-in for the launcher)."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schedmoe.tools.launch
from schedmoe.tools.bench import BenchConfig
from schedmoe.tools.cli import main
from schedmoe.sim import Cluster, Workload
from schedmoe.tools.train.run import TrainConfig

WORDS = st.sampled_from(["nan", "inf", "-inf", "1e309", "0", "-0", "-1", "1", "2", "7", "64",
                         "1e-300", "", "nope", "none", "nccl", "int8", "pipeline", "1-16",
                         "0-0", "3,1", "true", "4096", "99999999999"])
NUMBERS = st.one_of(st.integers(-10 ** 12, 10 ** 12).map(str), st.floats().map(repr))
VALUES = st.one_of(WORDS, NUMBERS, st.text(max_size=6))
JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers(-10 ** 15, 10 ** 15)
                    | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
FUZZ = settings(max_examples=60, deadline=timedelta(seconds=20),
                suppress_health_check=[HealthCheck.function_scoped_fixture])


class Spawned(Exception):
    """Raised by the stand-in launcher: the input was accepted and ranks would start."""


@pytest.fixture
def no_ranks(monkeypatch):
    def launcher(*_args, **_kwargs):
        raise Spawned

    monkeypatch.setattr(schedmoe.tools.launch, "run_ranks_here", launcher)
    monkeypatch.setattr(schedmoe.tools.launch, "spawn", launcher)


def exit_code(argv: list[str], capsys) -> int:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except Spawned:
        code = 0
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err, (argv, out.err[-2000:])
    if code == 2:
        assert "error:" in out.err.strip().splitlines()[-1], (argv, out.err)
    return code


def flags(names: list[str]) -> st.SearchStrategy[list[str]]:
    pairs = st.lists(st.tuples(st.sampled_from(names), VALUES), max_size=4)
    return pairs.map(lambda ps: [x for name, value in ps for x in (f"--{name}", value)])


def _names(cls) -> list[str]:
    return [f.name.replace("_", "-") for f in fields(cls) if f.name != "layer_options"]


@FUZZ
@given(argv=flags(_names(Workload) + [f.name.replace("_", "-") for f in fields(Cluster)
                                      if isinstance(getattr(Cluster(), f.name), (int, float))]
                  + ["degrees", "algorithms", "codecs", "top"]))
def test_simulate_flags(argv, capsys):
    assert exit_code(["simulate", "--top", "1", *argv], capsys) in (0, 2)


@FUZZ
@given(data=st.one_of(JSON, st.fixed_dictionaries(
    {}, optional={f.name: JSON | st.floats() | st.integers(-10 ** 6, 10 ** 6)
                  for f in fields(Cluster)})))
def test_cluster_files(data, tmp_path, capsys):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data))
    assert exit_code(["simulate", "--cluster", str(path), "--top", "1"], capsys) in (0, 2)


def test_deep_and_huge_cluster_files(tmp_path, capsys):
    deep, huge = tmp_path / "deep.json", tmp_path / "huge.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    huge.write_text(json.dumps({"name": "x" * (2 << 20)}))
    for path in (deep, huge, tmp_path / "missing.json"):
        assert exit_code(["simulate", "--cluster", str(path)], capsys) == 2


@FUZZ
@given(argv=flags(_names(BenchConfig) + ["ranks", "timeout", "local-size"]))
def test_bench_flags(argv, capsys, no_ranks):
    assert exit_code(["bench", *argv], capsys) in (0, 2)


@FUZZ
@given(argv=flags(_names(TrainConfig) + ["ranks", "timeout"]))
def test_train_flags(argv, capsys, no_ranks):
    assert exit_code(["train", *argv], capsys) in (0, 2)


@pytest.mark.parametrize("argv", [["bench", "--tokens", "-1"], ["bench", "--top-k", "9"],
                                  ["bench", "--compressor", "nope"], ["bench", "--tokens", "0"],
                                  ["train", "--hidden-dim", "0"], ["train", "--lr", "nan"],
                                  ["simulate", "--nic-gbit", "nan"],
                                  ["simulate", "--num-experts", "0"],
                                  ["simulate", "--degrees", "0-0"]])
def test_known_bad_flags_exit_2_before_any_rank_starts(argv, capsys, no_ranks):
    assert exit_code(argv, capsys) == 2
