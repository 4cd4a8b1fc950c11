"""The team server's checks that need no service: they fail before anything starts, with what to do."""

import pytest

from tltoolkit.errors import TltoolkitError
from tltoolkit.tracking.server import TeamServer, postgres_binaries


def test_a_named_postgres_folder_without_its_programs_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TLTOOLKIT_POSTGRES_BIN", str(tmp_path))
    with pytest.raises(TltoolkitError, match=rf"initdb, pg_ctl, psql, createdb\) were not found in .*{tmp_path.name}"):
        postgres_binaries()
    with pytest.raises(TltoolkitError, match="apt-get install postgresql"):
        TeamServer(tmp_path / "server").start()
    assert not (tmp_path / "server").exists(), "nothing made before the check"


def test_binding_beyond_loopback_needs_the_host_names_clients_use(tmp_path):
    with pytest.raises(TltoolkitError, match="Binding the server to 0.0.0.0 .* --allowed-hosts"):
        TeamServer(tmp_path / "server", host="0.0.0.0").start()
    server = TeamServer(tmp_path, host="0.0.0.0", port=5001, allowed_hosts="tracking.example.com")
    command = server.command("postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow")
    assert command[command.index("--allowed-hosts") + 1].startswith("tracking.example.com,tracking.example.com:5001")
    assert "--serve-artifacts" in command and str(tmp_path / "artifacts") in command
