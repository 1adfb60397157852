"""Pure pieces of the GitHub work: where GitHub lives, Link pagination, token expiry, cell
selection and the cells file."""

from __future__ import annotations

import time

import pytest

from tabbi_extension import cells
from tabbi_extension.github.oauth import OAuthFailure, TokenSet
from tabbi_extension.github.rest import GitHubHosts, next_page
from tabbi_extension.push import parse_author
from tabbi_extension.validation import ValidationError


def test_hosts_for_github_com_and_enterprise():
    dotcom = GitHubHosts()
    assert (dotcom.web, dotcom.api) == ("https://github.com", "https://api.github.com")
    assert dotcom.noreply_email({"id": 7, "login": "ada"}) == "7+ada@users.noreply.github.com"
    ghes = GitHubHosts("https://git.corp.example/")
    assert (ghes.web, ghes.api) == ("https://git.corp.example", "https://git.corp.example/api/v3")
    assert ghes.noreply_email({"id": 7, "login": "ada"}) == "7+ada@users.noreply.git.corp.example"
    assert GitHubHosts("https://h", "https://api.h/").api == "https://api.h"


def test_link_header_next_page():
    link = ('<https://api.github.com/user/repos?page=3>; rel="next", '
            '<https://api.github.com/user/repos?page=9>; rel="last"')
    assert next_page(link) == "https://api.github.com/user/repos?page=3"
    assert next_page('<https://x/?page=1>; rel="prev"') is None
    assert next_page(None) is None


def test_token_sets_from_oauth_app_and_github_app_answers():
    now = time.time()
    oauth = TokenSet.from_response({"access_token": "gho_x", "scope": "repo"}, now)
    assert oauth.expires_at is None and not oauth.expires_within(10**9)
    app = TokenSet.from_response({"access_token": "ghu_x", "expires_in": 28800, "refresh_token": "ghr_x",
                                  "refresh_token_expires_in": 15897600}, now)
    assert app.expires_at == now + 28800 and app.refresh_token == "ghr_x"
    assert app.expires_within(28800 + 60) and not app.expires_within(60)
    assert "ghu_x" not in repr(app) and "ghr_x" not in repr(app)
    with pytest.raises(OAuthFailure):
        TokenSet.from_response({"error": "bad_verification_code"})


NOTEBOOK = {"cells": [
    {"cell_type": "markdown", "id": "m1", "source": ["# Title\n", "\n", "text"], "metadata": {"tags": ["a"]}},
    {"cell_type": "code", "id": "c1", "source": "!pip install x\nimport x", "metadata": {}},
    {"cell_type": "code", "id": "c2", "source": "x.run()\n", "metadata": {"tags": ["a", "b"]}},
    {"cell_type": "raw", "id": "r1", "source": "raw", "metadata": {"tags": ["a"]}},
]}


def test_cell_selection_by_tag_number_range_and_id_in_notebook_order():
    ids = lambda selector: [c["id"] for c in cells.select(NOTEBOOK, selector)]  # noqa: E731
    assert ids("a") == ["m1", "c2", "r1"]
    assert ids("3,1") == ["m1", "c2"]
    assert ids("1-2,id:c2,b") == ["m1", "c1", "c2"]
    for bad, message in (("zz", "no cell is tagged"), ("0", "outside"), ("2-9", "outside"),
                         ("id:nope", "no cell has the id"), ("a b", "cannot read"), ("", "names the cells")):
        with pytest.raises(ValidationError, match=message):
            cells.select(NOTEBOOK, bad)


def test_cells_file_is_deterministic_valid_python_without_outputs():
    path, text = cells.file_for(NOTEBOOK, "work/My Analysis.ipynb", "1-3", None)
    assert path == "notebooks/My_Analysis.py"
    assert text == (
        "# Cells 1-3 of My Analysis.ipynb, pushed by tabbi. Edit them in the notebook.\n\n"
        "# %% [markdown]\n# # Title\n#\n# text\n\n"
        "# %%\n# !pip install x\nimport x\n\n"
        "# %%\nx.run()\n"
    )
    compile(text, "cells.py", "exec")
    assert cells.file_for(NOTEBOOK, "work/My Analysis.ipynb", "1-3", None)[1] == text
    assert cells.file_for(NOTEBOOK, "nb.ipynb", "b", None)[0] == "notebooks/nb-b.py"
    assert cells.file_for(NOTEBOOK, "nb.ipynb", "b", "src/x.py")[0] == "src/x.py"
    for bad in ("../x.py", "/etc/x.py", ".git/hooks/pre-commit", "-x"):
        with pytest.raises(ValidationError):
            cells.file_for(NOTEBOOK, "nb.ipynb", "b", bad)


def test_commit_author_override():
    assert parse_author("Ada Lovelace <ada@example.com>") == ("Ada Lovelace", "ada@example.com")
    assert parse_author(None) is None
    for bad in ("ada@example.com", "Ada <no-at>", "A <a@b> extra", "Ada\n <a@b.c>"):
        with pytest.raises(ValidationError):
            parse_author(bad)
