"""The ``jupyter tabbi`` command (the ``jupyter-tabbi`` console script): operator tools that read
the Jupyter server's own configuration. ``jupyter tabbi doctor`` checks an installation."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from jupyter_core.application import JupyterApp
from traitlets import Bool, Float

from .app import TabbiExtension
from .doctor import Doctor


class TabbiDoctor(JupyterApp):
    """Loads the config files the server loads (``jupyter_config``, ``jupyter_server_config``,
    or ``--config=FILE``), so ``c.TabbiExtension.*``, ``c.LocalProvider.*``, ``c.ConvexStore.*``
    ... apply exactly as they do in the server."""

    name = "jupyter-tabbi-doctor"
    description = ("Check tabbi's installation and configuration: OpenCode, bubblewrap, the model "
                   "endpoint, GitHub sign-in, Modal, the store, the encryption key, disk space. "
                   "Prints one line per check; exits 1 when something is wrong.")
    config_file_name = "jupyter_server_config"
    classes = [TabbiExtension]

    json = Bool(False, help="Print the checks as one JSON object instead of lines.").tag(config=True)
    min_free_disk_gb = Float(
        1.0, help="Free disk (GB) under data_dir below which the disk check fails: snapshots and "
        "sandboxes' workspaces live there.").tag(config=True)

    flags = {**JupyterApp.flags,
             "json": ({"TabbiDoctor": {"json": True}}, "Print the checks as JSON.")}
    aliases = {**JupyterApp.aliases, "min-free-disk-gb": "TabbiDoctor.min_free_disk_gb"}

    def start(self) -> None:
        ext = TabbiExtension(config=self.config)
        identity = self.config.get("ServerApp", {}).get("identity_provider_class")
        single = ext.single_user if ext.single_user is not None else not identity
        checks = asyncio.run(Doctor(ext, self.min_free_disk_gb, single).run())
        failed = [c for c in checks if not c.ok]
        if self.json:
            report: dict[str, Any] = {"ok": not failed, "checks": [c.public() for c in checks]}
            print(json.dumps(report, indent=2))
        else:
            for check in checks:
                print(check.line())
            print(f"{len(failed)} problem(s) found." if failed else "Everything checked is fine.")
        self.exit(1 if failed else 0)


class TabbiApp(JupyterApp):
    name = "jupyter-tabbi"
    description = "Operator tools for tabbi."
    subcommands = {"doctor": (TabbiDoctor, TabbiDoctor.description.split(":")[0] + ".")}

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            print("Usage: jupyter tabbi doctor [--json] [--config=FILE]", file=sys.stderr)
            self.exit(2)
        super().start()


main = TabbiApp.launch_instance
