"""Object ids in Modal's shapes: a type prefix and random alphanumerics.

A sandbox id must NOT be ``sb-`` plus exactly 22 alphanumerics: the client takes that shape for a
V1 sandbox and would use the older RPCs. V2 task ids end in ``V``, as the client expects.
"""

from __future__ import annotations

import secrets
import string

_ALNUM = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 22) -> str:
    return f"{prefix}-" + "".join(secrets.choice(_ALNUM) for _ in range(length))


def new_sandbox_id() -> str:
    return new_id("sb", 24)


def new_task_id() -> str:
    return new_id("ta", 21) + "V"
