"""data.eval: one set, a list or a named map; names and caps follow the file they describe."""
from __future__ import annotations

import pytest

from engine.config import eval_sets
from engine.errors import ShrinkError
from shrink.config import asset_path
from tests.conftest import compose_config

SHAKESPEARE = asset_path("shakespeare-eval.jsonl.gz")


def test_the_presets_own_file_keeps_its_name_and_cap() -> None:
    (s,) = eval_sets(compose_config([]).data.eval)
    assert (s.name, s.path, s.max_windows, s.seq_len) == ("shakespeare", SHAKESPEARE, 32, 512)
    (d,) = eval_sets(compose_config(["data=docs_en"]).data.eval)
    assert (d.name, d.max_windows) == ("docs-en-test", None)


def test_an_overridden_path_gets_its_own_stem_and_no_inherited_cap(tmp_path) -> None:
    (s,) = eval_sets(compose_config([f"data.eval.path={tmp_path / 'test.jsonl.gz'}"]).data.eval)
    assert (s.name, s.max_windows) == ("test", None)
    (s,) = eval_sets(compose_config([f"data.eval.path={tmp_path / 'docs-en' / 'valid.jsonl.gz'}", "data=docs_en"]).data.eval)
    assert (s.name, s.max_windows) == ("valid", None)
    given = compose_config([f"data.eval.path={tmp_path / 'a.jsonl'}", "data.eval.name=mine", "data.eval.max_windows=3"])
    (s,) = eval_sets(given.data.eval)
    assert (s.name, s.max_windows) == ("mine", 3)


def test_a_list_and_a_named_map_of_sets(tmp_path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.txt"
    sets = eval_sets(compose_config(["data.eval=null", f"data.eval=[{{path:{a}}},{{path:{b},seq_len:64,name:bee}}]"]).data.eval)
    assert [(s.name, s.seq_len, s.key) for s in sets] == [("a", 512, "data.eval[0]"), ("bee", 64, "data.eval[1]")]
    sets = eval_sets(compose_config(["data.eval=null", f"data.eval={{x:{{path:{a}}},y:{{path:{a},max_windows:2}}}}"]).data.eval)
    assert [(s.name, s.max_windows) for s in sets] == [("x", None), ("y", 2)]


def test_bad_sets_are_one_line_errors(tmp_path) -> None:
    a = tmp_path / "a.jsonl"
    with pytest.raises(ShrinkError, match=r"data.eval\[1\].name: two eval sets are named 'a'"):
        eval_sets(compose_config(["data.eval=null", f"data.eval=[{{path:{a}}},{{path:{a}}}]"]).data.eval)
    with pytest.raises(ShrinkError, match="data.eval: .*abc"):
        eval_sets(compose_config(["data.eval.seq_len=abc"]).data.eval)
    with pytest.raises(ShrinkError, match=r"data.eval\[0\]: .*colour"):
        eval_sets(compose_config(["data.eval=null", f"data.eval=[{{path:{a},colour:red}}]"]).data.eval)
    with pytest.raises(ShrinkError, match="max_windows must be positive"):
        eval_sets(compose_config(["data.eval.max_windows=0"]).data.eval)
