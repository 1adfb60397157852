"""A push's cells as the kernel sends them (extension/cells.py ``from_request``): checked at the
edge, field by field, so the service (in hub mode another OS user, holding the team's secrets)
gets only cell text and never a path to read.

Threat: a person's code (or the agent, through the person's kernel) sending shapes the server
did not expect: a path in place of cells, objects as sources, huge tag lists, ids with path
characters, a notebook "name" that is a path into the server's files."""

from __future__ import annotations

import pytest

from tabbi_extension import cells
from tabbi_extension.validation import ValidationError

SENT = [{"cell_type": "markdown", "source": ["# Load\n", "Read."], "id": "a1", "tags": ["export"]},
        {"cell_type": "code", "source": "x = 1", "id": None, "tags": None}]


def test_the_kernels_cells_become_a_notebook_to_select_from():
    name, notebook = cells.from_request({"notebook": "/home/alice/work/My.ipynb", "cells": SENT})
    assert name == "My.ipynb"  # only a name: nothing of the server's is looked up
    assert notebook == {"cells": [
        {"cell_type": "markdown", "source": "# Load\nRead.", "metadata": {"tags": ["export"]}, "id": "a1"},
        {"cell_type": "code", "source": "x = 1", "metadata": {"tags": []}}]}
    assert [c["source"] for c in cells.select(notebook, "export")] == ["# Load\nRead."]


@pytest.mark.parametrize(("request_", "why"), [
    ({"notebook": "x.ipynb", "cells": "/etc/passwd"}, "the notebook's cells"),
    ({"notebook": "x.ipynb"}, "the notebook's cells"),
    ({"notebook": "x.ipynb", "cells": [{}] * (cells.MAX_CELLS + 1)}, "at most"),
    ({"notebook": "x.ipynb", "cells": ["print(1)"]}, "cell_type is one of"),
    ({"notebook": "x.ipynb", "cells": [{"cell_type": "output", "source": ""}]}, "cell_type is one of"),
    ({"notebook": "x.ipynb", "cells": [{"cell_type": "code", "source": {"a": 1}}]}, "'source' must be text"),
    ({"notebook": "x.ipynb", "cells": [{"cell_type": "code", "source": ["a", 2]}]}, "'source' must be text"),
    ({"notebook": "x.ipynb", "cells": [{"cell_type": "code", "id": "../x"}]}, "'id' must be"),
    ({"notebook": "x.ipynb", "cells": [{"cell_type": "code", "tags": ["t"] * 51}]}, "'tags' must be"),
    ({"notebook": "x.ipynb", "cells": [{"cell_type": "code", "tags": [{"t": 1}]}]}, "'tags' must be"),
    ({"notebook": "/etc/passwd", "cells": []}, "saved .ipynb"),
    ({"notebook": "a\0.ipynb", "cells": []}, "saved .ipynb"),
    ({"notebook": "x" * 300 + ".ipynb", "cells": []}, "saved .ipynb"),
    (["x.ipynb"], "must be an object"),
])
def test_anything_else_is_refused_with_what_was_expected(request_, why):
    with pytest.raises(ValidationError, match=why):
        cells.from_request(request_)
