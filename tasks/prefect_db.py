"""A new Prefect server's SQLite database, started from a migrated empty one instead of built by migrations.

``prefect server start`` on a database file that does not exist yet creates it by running every Alembic
migration Prefect ships: on 2 cores that took 7-30 s, more than the rest of the server's start (seeded, the same
start took 21 s where a new database took 37-53 s, measured side by side on a loaded machine). A new database is
the rule, not the exception: the first ``lm-sleep run`` on a machine, every ``PREFECT_HOME`` a test or a benchmark
makes. :func:`seed_database` copies a template in its place: a database migrated once per machine and Prefect
version (``make install`` builds it; else the first server that needs one does), stored under the project's cache
(``$LM_SLEEP_CACHE/prefect/<version>/prefect.db``) as a compact single file (``VACUUM INTO``). The server then finds
its schema at Alembic's head and migrates nothing.

Only where the database is surely the server's: the default ``$PREFECT_HOME/prefect.db``, or a
``sqlite+aiosqlite:///`` file named by ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` (or the older
``PREFECT_API_DATABASE_CONNECTION_URL``) in the environment. Another database (PostgreSQL, settings of a Prefect
profile or ``prefect.toml``, an existing file) is left to Prefect as it is. ``LM_SLEEP_PREFECT_DB_TEMPLATE=0``
switches the template off (``bench/server_start.py`` compares the two). Not a Prefect task: the glue
``flows.server.local_server`` and the tests' module servers call before a server starts.

    python -m tasks.prefect_db           # build the template if this machine has none (make install)
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from model.io import atomic_path, cache_root


SQLITE = "sqlite+aiosqlite:///"
SWITCH = "LM_SLEEP_PREFECT_DB_TEMPLATE"  # "0": every new database is migrated by its server, as Prefect does
URL_KEYS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


class TemplateError(RuntimeError):
    """The template database could not be built; the message holds the end of Prefect's output."""


def prefect_home(env: Mapping[str, str]) -> Path:
    return Path(env.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def database_path(env: Mapping[str, str], cwd: Path | None = None) -> Path | None:
    """The SQLite file a ``prefect server start`` with environment ``env`` opens, where that is certain from the
    environment; None where it is not (another database, or database settings in a profile or config file)."""
    database_keys = [k for k in env if "_DATABASE_" in k and k.startswith("PREFECT_")]
    urls = [env[k] for k in URL_KEYS if env.get(k)]
    if len(database_keys) > len(urls):  # driver, host, name, ... of another database
        return None
    if urls:
        url = urls[0]
        path = url[len(SQLITE):] if url.startswith(SQLITE) else ""
        if not path or path.startswith(("file:", ":memory:")) or "?" in path:
            return None
        return Path(path).expanduser()
    # the default path, unless a settings file Prefect reads names a database
    home = prefect_home(env)
    profiles = Path(env.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    cwd = cwd or Path.cwd()
    for settings, names_one in ((profiles, lambda text: "DATABASE" in text),
                                (cwd / "prefect.toml", lambda text: "DATABASE" in text),
                                (cwd / "pyproject.toml", lambda text: "[TOOL.PREFECT" in text and "DATABASE" in text),
                                (cwd / ".env", lambda text: any(line.strip().startswith("PREFECT_") and "DATABASE" in line
                                                                for line in text.splitlines()))):
        try:
            text = settings.read_text(errors="replace").upper()
        except OSError:
            continue
        if names_one(text):
            return None
    return home / "prefect.db"


def template_path() -> Path:
    return cache_root() / "prefect" / importlib.metadata.version("prefect") / "prefect.db"


def build_template(dest: Path | None = None, timeout: float = 600.0) -> Path:
    """Migrate a new database to Prefect's head in a temporary directory and store it compacted at ``dest``
    (default :func:`template_path`), atomically: a concurrent builder or reader sees the whole file or none."""
    dest = dest or template_path()
    with tempfile.TemporaryDirectory(prefix="lm-sleep-prefect-db-") as tmp:
        db = Path(tmp) / "prefect.db"
        env = {k: v for k, v in os.environ.items() if not (k.startswith("PREFECT_") and "_DATABASE_" in k)}
        env |= {"PREFECT_HOME": tmp, URL_KEYS[0]: SQLITE + str(db), "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        out = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                             env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0 or not db.is_file():
            raise TemplateError(f"prefect server database upgrade exited {out.returncode}:\n"
                                f"{(out.stdout + out.stderr)[-2000:]}")
        with atomic_path(dest) as part:
            con = sqlite3.connect(db)
            try:
                con.execute("VACUUM INTO ?", (str(part),))  # one file, no WAL beside it
            finally:
                con.close()
    return dest


def seed_database(env: Mapping[str, str], cwd: Path | None = None) -> Path | None:
    """Before a server with environment ``env`` starts: where its database is a SQLite file that does not exist
    yet, put a copy of the template there (building the template first if this machine has none). Returns the
    seeded path, or None where nothing was done. A template that cannot be built leaves the database to the
    server's own migrations (the error is printed, the start goes on)."""
    if env.get(SWITCH, "1") == "0":
        return None
    path = database_path(env, cwd)
    if path is None or path.exists():
        return None
    template = template_path()
    if not template.is_file():
        try:
            build_template(template)
        except (TemplateError, OSError, subprocess.TimeoutExpired) as e:
            print(f"note: no Prefect database template ({e}); the server migrates its own", file=sys.stderr)
            return None
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # as Prefect makes PREFECT_HOME
    with atomic_path(path) as part:
        shutil.copyfile(template, part)
    return path


def main() -> int:
    target = template_path()
    if target.is_file():
        print(f"{target}: present")
    else:
        build_template(target)
        print(f"{target}: built")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
