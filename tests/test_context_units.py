"""The context gatherers (tabbi_kernel/context.py) and the server's side of attachments, without a
server: a real in-process IPython shell, real pandas/polars/numpy objects, the real validation,
normalizer, conversation reducer and stores' code paths."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import polars as pl
import pytest
from IPython.core.interactiveshell import InteractiveShell

from tabbi_extension.agent import attached, attachment_blocks
from tabbi_extension.normalize import EventNormalizer
from tabbi_extension.validation import (
    MAX_ATTACHMENT_BYTES,
    MAX_ATTACHMENTS,
    ValidationError,
    validate_attachments,
)
from tabbi_kernel import context
from tabbi_kernel.context import Attachment, ContextError, gather
from tabbi_kernel.conversation import Conversation, transcript_text


@pytest.fixture(scope="module")
def shell():
    shell = InteractiveShell.instance()
    context.install(shell)
    yield shell
    InteractiveShell.clear_instance()


@pytest.fixture
def fresh_error(shell):
    """No earlier test's error leaks into this one."""
    for name in ("last_exc", "last_value", "last_type", "last_traceback"):
        if hasattr(sys, name):
            delattr(sys, name)
    context._failed.clear()
    return shell


def test_a_pandas_frame_is_its_schema_shape_and_head_never_its_rows(shell):
    n = 200_000
    shell.user_ns["df_sales"] = pd.DataFrame({
        "region": ["north"] * (n - 1) + ["ROW-NOT-IN-HEAD"], "units": np.arange(n, dtype="int32"),
        "price": np.linspace(0, 1, n), "when": pd.date_range("2024-01-01", periods=n, freq="min"),
    })
    [a] = gather("df_sales", shell)
    assert (a.kind, a.label, a.truncated) == ("variable", "df_sales", False)
    assert "200,000 rows x 4 columns" in a.content
    frame = shell.user_ns["df_sales"]
    for column in frame.columns:
        assert f"  {column}: {frame.dtypes[column]}\n" in a.content, a.content
    assert "units: int32" in a.content
    assert "north" in a.content and "ROW-NOT-IN-HEAD" not in a.content
    assert a.size < 2000


def test_polars_frames_lazy_frames_series_and_numpy_arrays(shell):
    shell.user_ns.update(
        pl_df=pl.DataFrame({"id": list(range(1000)), "name": [f"n{i}" for i in range(1000)]}),
        arr=np.arange(1_000_000, dtype="float32").reshape(1000, 1000),
        s=pd.Series([1.5, 2.5], name="ratio"),
    )
    # A lazy frame whose plan would fail if anything ran it: describing it must not collect.
    shell.user_ns["lazy"] = pl.LazyFrame({"x": [1, 2]}).with_columns(
        y=pl.col("x").map_elements(lambda v: 1 // 0, return_dtype=pl.Int64))
    polars_df, array, lazy, series = gather(["pl_df", "arr", "lazy", "s"], shell)
    assert "polars.DataFrame, 1,000 rows x 2 columns" in polars_df.content
    assert "id: Int64" in polars_df.content and "name: String" in polars_df.content
    assert "n4" in polars_df.content
    assert "n999" not in polars_df.content
    assert "shape (1000, 1000), dtype float32, 4,000,000 bytes" in array.content
    assert "[0.0, 1.0, 2.0" in array.content and "999999" not in array.content
    assert "not collected" in lazy.content and "y: Int64" in lazy.content
    assert "pandas.Series 'ratio', dtype float64, length 2" in series.content


def test_other_objects_are_a_bounded_repr_and_names_are_checked(shell):
    shell.user_ns["big"] = list(range(1_000_000))
    shell.user_ns["cfg"] = {"a": 1}
    big, cfg = gather("big,cfg", shell)
    assert big.size < 1000 and "..." in big.content
    assert "cfg: dict: {'a': 1}" in cfg.content
    with pytest.raises(ContextError, match="no variable 'missing'"):
        gather("missing", shell)
    with pytest.raises(ContextError, match="not a variable name"):
        gather("os.system('x')", shell)
    with pytest.raises(ContextError, match="unknown attachment"):
        gather("@nope", shell)


def test_truncation_is_stated_in_the_text_and_the_flag():
    text, cut = context.clip("x" * 1_000_000, 1000)
    assert cut and text.endswith("[truncated: 920 of 1,000,000 bytes shown]")
    assert len(text.encode()) <= 1000
    assert context.clip("short", 1000) == ("short", False)
    wide = pd.DataFrame({f"column_with_a_long_name_{i}": [i] for i in range(400)})
    a = context.variable("wide", wide)
    assert a.truncated and "[truncated:" in a.content and a.size <= context.LIMITS["variable"]


def test_cells_by_number_as_executed_and_the_saved_notebook(shell, tmp_path, monkeypatch):
    shell.run_cell("first_cell = 1", store_history=True)
    n = shell.execution_count - 1
    shell.run_cell("second_cell = 2", store_history=True)
    [one] = gather(f"@cell:{n}", shell)
    assert one.kind == "cells" and one.content == f"# In[{n}]:\nfirst_cell = 1"
    [both] = gather(f"@cell:{n}-{n + 1}", shell)
    assert "first_cell = 1" in both.content and "second_cell = 2" in both.content
    with pytest.raises(ContextError, match="has run"):
        gather(f"@cell:{n + 50}", shell)
    with pytest.raises(ContextError, match="write @cell:N"):
        gather("@cell:x", shell)
    notebook = tmp_path / "analysis.ipynb"
    notebook.write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": ["# Sales"], "metadata": {}},
        {"cell_type": "code", "source": "df = load()", "metadata": {},
         "outputs": [{"text": "SECRET-OUTPUT"}]},
    ]}))
    monkeypatch.setenv("JPY_SESSION_NAME", str(notebook))
    [saved] = gather("@cells", shell)
    assert "the saved notebook analysis.ipynb (2 cells)" in saved.content
    assert "# cell 2 (code):\ndf = load()" in saved.content and "SECRET-OUTPUT" not in saved.content
    monkeypatch.delenv("JPY_SESSION_NAME")
    [history] = gather("@cells", shell)
    assert "as executed" in history.content and "second_cell = 2" in history.content


def test_the_last_error_with_its_cell_and_the_fix_request(fresh_error):
    shell = fresh_error
    with pytest.raises(ContextError, match="no error yet"):
        gather("@error", shell)
    shell.user_ns.update(np=np, prices=pd.DataFrame({"p": [1, 2]}), unrelated="MARKER-UNRELATED")
    shell.run_cell("def ratio(frame):\n    return frame['q'].sum() / 0\n", store_history=True)
    result = shell.run_cell("np.zeros(1)\ntotal = ratio(prices)", store_history=True)
    assert result.error_in_exec is not None
    [error] = gather("@error", shell)
    assert error.kind == "error" and "KeyError: 'q'" in error.content
    assert "Traceback (most recent call last)" in error.content and "\x1b[" not in error.content
    assert f"The cell that raised it (In[{result.execution_count}]):\nnp.zeros(1)\ntotal = ratio(prices)" \
        in error.content and not error.truncated
    text, attachments = context.fix_request(shell, "it should use column p")
    assert [a.label for a in attachments] == ["@error", "prices"]  # not np (a module), ratio (a function)
    assert "fix it there (not in the notebook" in text and text.endswith("it should use column p")
    assert "MARKER-UNRELATED" not in json.dumps([a.to_dict() for a in attachments])
    huge = shell.run_cell("raise ValueError('start ' + 'v' * 30_000 + ' END-OF-MESSAGE')")
    assert huge.error_in_exec is not None
    [long] = gather("@error", shell)
    assert long.truncated and long.content.startswith("[truncated: 10,000 of ")
    assert "END-OF-MESSAGE" in long.content and "raise ValueError('start '" in long.content


def test_files_of_the_working_directory_only(tmp_path, monkeypatch):
    """The threat: a chip or --with that reads past the notebook's folder (``../``, an absolute
    path, a link out), blocks the kernel on a FIFO, or sends binary garbage to the model."""
    root = tmp_path / "nb"
    (root / "data").mkdir(parents=True)
    (root / "data" / "schema.sql").write_text("CREATE TABLE sales (id int);\n")
    (root / "big.txt").write_text("y" * 100_000)
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "outside.txt").write_text("OUTSIDE")
    (root / "link").symlink_to(tmp_path / "outside.txt")
    os.mkfifo(root / "fifo")
    monkeypatch.chdir(root)
    [ok] = gather("@file:data/schema.sql")
    assert ok.kind == "file" and ok.content == "CREATE TABLE sales (id int);\n" and not ok.truncated
    [big] = gather("@file:big.txt")
    assert big.truncated and "of 100,000 bytes shown]" in big.content
    for spec, why in [("@file:../outside.txt", "leads out"), (f"@file:{tmp_path}/outside.txt", "relative"),
                      ("@file:link", "leads out"), ("@file:fifo", "not a regular file"),
                      ("@file:blob.bin", "binary"), ("@file:nope.txt", "no such file")]:
        with pytest.raises(ContextError, match=why):
            gather(spec)


def test_specs_parse_the_same_everywhere():
    assert context.parse_specs("df, @cell:3,,@error ,df") == ["df", "@cell:3", "@error"]
    assert context.parse_specs(["df,@error", "@cells"]) == ["df", "@error", "@cells"]
    ready = Attachment("variable", "x", "x: 1")
    assert gather([ready]) == [ready]


def test_the_edge_refuses_what_is_malformed_or_too_large():
    good = {"kind": "variable", "label": "df", "content": "x", "truncated": False}
    assert validate_attachments(None) == [] and validate_attachments([good]) == [good]
    assert validate_attachments([{**good, "extra": 1}]) == [good]
    bad = [
        ("x", "must be a list"),
        ([good] * (MAX_ATTACHMENTS + 1), "at most"),
        (["x"], "must be an object"),
        ([{**good, "kind": "secret"}], "'kind' must be one of"),
        ([{**good, "label": ""}], "'label'"),
        ([{**good, "label": "a\nb"}], "'label'"),
        ([{**good, "content": 5}], "'content' must be a string"),
        ([{**good, "content": "\0"}], "NUL"),
        ([{**good, "content": "\ud800"}], "not valid Unicode"),
        ([{**good, "truncated": "no"}], "true or false"),
        ([{**good, "content": "x" * (MAX_ATTACHMENT_BYTES + 1)}], "the limit per attachment"),
        ([{**good, "content": "x" * 60_000}] * 5, "in all"),
    ]
    for value, message in bad:
        with pytest.raises(ValidationError, match=message):
            validate_attachments(value)


def test_the_model_gets_labelled_blocks_and_the_log_only_a_summary():
    items = [{"kind": "variable", "label": 'df "x"', "content": "schema é", "truncated": True}]
    [block] = attachment_blocks(items)
    assert block.startswith("<attachment kind=\"variable\" label=\"df 'x'\" truncated=\"true\">")
    assert "schema é" in block and block.endswith("</attachment>")
    assert attached(items) == {"attachments": [{"kind": "variable", "label": 'df "x"', "truncated": True,
                                                "bytes": 9}]}
    assert attached([]) == {}


def test_synthetic_parts_of_the_user_message_are_not_shown_and_badges_are():
    normalizer = EventNormalizer("oc")
    normalizer.feed({"type": "message.updated", "properties": {"info": {"id": "m1", "role": "user",
                                                                         "sessionID": "oc"}}})
    part = {"messageID": "m1", "sessionID": "oc", "type": "text"}
    shown = normalizer.feed({"type": "message.part.updated", "properties": {"part": {**part, "id": "p1",
                                                                                     "text": "hello"}}})
    hidden = normalizer.feed({"type": "message.part.updated", "properties": {"part": {
        **part, "id": "p2", "text": "<attachment>", "synthetic": True}}})
    assert [n.type for n in shown[0]] == ["part.updated"] and hidden[0] == []
    meta = [{"kind": "error", "label": "@error", "bytes": 3000, "truncated": True}]
    conv = Conversation().apply_all([
        {"seq": 1, "type": "turn.started", "data": {"prompt_id": "p", "text": "fix", "attachments": meta}},
        {"seq": 2, "type": "message", "data": {"message_id": "m1", "role": "user"}},
        {"seq": 3, "type": "part.updated", "data": {"message_id": "m1", "part_id": "p1", "part_type": "text",
                                                    "role": "user", "text": "fix"}},
        {"seq": 4, "type": "turn.finished", "data": {"prompt_id": "p", "outcome": "completed"}},
    ])
    assert conv.messages[0]["attachments"] == meta and conv.turns[0].to_dict()["attachments"] == meta
    assert "attached: @error (error, 3.0 KB, truncated)" in transcript_text(conv, "t")
