"""tasks/prefect_db.py: a new Prefect server database starts as a copy of a migrated template, only where the
database is surely the server's SQLite file, and a real server starts and serves on it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tasks.prefect_db import SQLITE, SWITCH, build_template, database_path, seed_database, template_path
from tests.flows.helpers import free_port, stop, wait_for


def _alembic_head() -> str:
    """Prefect's own head revision for SQLite, read from its migration scripts."""
    import prefect.server.database as database
    from alembic.script import ScriptDirectory

    base = Path(database.__file__).parent / "_migrations"
    (head,) = ScriptDirectory(str(base), version_locations=[str(base / "versions" / "sqlite")]).get_heads()
    return head


def _revision(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    finally:
        con.close()


def test_the_database_path_is_named_only_where_the_environment_makes_it_certain(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "project"
    cwd.mkdir()
    env = {"PREFECT_HOME": str(home)}
    assert database_path(env, cwd) == home / "prefect.db"
    url = {"PREFECT_SERVER_DATABASE_CONNECTION_URL": SQLITE + str(tmp_path / "x.db")}
    assert database_path(env | url, cwd) == tmp_path / "x.db"
    assert database_path(env | {"PREFECT_API_DATABASE_CONNECTION_URL": SQLITE + str(tmp_path / "y.db")}, cwd) \
        == tmp_path / "y.db"
    for other in ({"PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://u:p@db/prefect"},
                  {"PREFECT_SERVER_DATABASE_CONNECTION_URL": SQLITE + ":memory:"},
                  {"PREFECT_SERVER_DATABASE_CONNECTION_URL": SQLITE + "file:x.db?mode=memory"},
                  url | {"PREFECT_SERVER_DATABASE_TIMEOUT": "30"},
                  {"PREFECT_SERVER_DATABASE_HOST": "db"}):
        assert database_path(env | other, cwd) is None, other
    # settings files Prefect reads that name a database: the path is Prefect's business
    home.mkdir()
    (home / "profiles.toml").write_text('[profiles.default]\nPREFECT_SERVER_DATABASE_CONNECTION_URL = "x"\n')
    assert database_path(env, cwd) is None
    (home / "profiles.toml").write_text('[profiles.default]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n')
    assert database_path(env, cwd) == home / "prefect.db"
    (cwd / "pyproject.toml").write_text('[project]\nname = "database-tools"\n')  # no Prefect section
    assert database_path(env, cwd) == home / "prefect.db"
    (cwd / "pyproject.toml").write_text('[tool.prefect.server.database]\nconnection_url = "x"\n')
    assert database_path(env, cwd) is None
    (cwd / "pyproject.toml").unlink()
    (cwd / ".env").write_text("PREFECT_SERVER_DATABASE_CONNECTION_URL=x\n")
    assert database_path(env, cwd) is None


@pytest.mark.slow
def test_a_new_database_is_the_migrated_template_and_a_server_serves_on_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LM_SLEEP_CACHE", str(tmp_path / "cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    home = tmp_path / "home"
    env = {"PREFECT_HOME": str(home)}
    assert not template_path().exists()
    assert seed_database(env | {SWITCH: "0"}, cwd) is None and not (home / "prefect.db").exists()  # switched off

    assert seed_database(env, cwd) == home / "prefect.db"  # builds the template, then copies it
    template = template_path()
    assert template.is_file() and (home / "prefect.db").read_bytes() == template.read_bytes()
    assert _revision(template) == _alembic_head()
    built = template.stat().st_mtime_ns

    other = tmp_path / "other" / "p.db"
    assert seed_database({"PREFECT_SERVER_DATABASE_CONNECTION_URL": SQLITE + str(other)}, cwd) == other
    assert template.stat().st_mtime_ns == built  # copied, not built again
    other.write_bytes(b"a database of the user's")
    assert seed_database({"PREFECT_SERVER_DATABASE_CONNECTION_URL": SQLITE + str(other)}, cwd) is None
    assert other.read_bytes() == b"a database of the user's"  # an existing file is never replaced
    assert not [p for p in (home, other.parent, template.parent) for q in p.iterdir() if q.suffix == ".tmp"]

    # a real server on the seeded database: healthy, and its tables answer (a flow is created and read back)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "server.log"
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | env | {
        "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=server_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 120, "prefect server /api/health", log)
        made = httpx.post(f"{url}/flows/", json={"name": "seeded"}, timeout=10)
        assert made.status_code in (200, 201), made.text
        assert httpx.get(f"{url}/flows/{made.json()['id']}", timeout=10).json()["name"] == "seeded"
    finally:
        stop(proc, signal.SIGTERM)
    assert _revision(home / "prefect.db") == _alembic_head()  # the server found nothing to migrate


def test_a_template_that_cannot_be_built_leaves_the_database_to_the_server(tmp_path: Path, monkeypatch,
                                                                            capsys) -> None:
    monkeypatch.setenv("LM_SLEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))  # Prefect's migrations cannot run
    with pytest.raises(OSError):
        build_template()
    assert not template_path().exists()
    home = tmp_path / "home"
    assert seed_database({"PREFECT_HOME": str(home)}, tmp_path) is None  # the start goes on, migrating its own
    assert not (home / "prefect.db").exists() and not template_path().exists()
    assert "no Prefect database template" in capsys.readouterr().err
