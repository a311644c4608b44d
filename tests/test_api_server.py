"""flows/api_server.py: the temporary Prefect server a CLI run starts itself, early (``begin``) and without importing
Prefect's server; it opens no database before it is told to serve."""
import subprocess
import sys

from prefect.settings import (PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL,
                              get_current_settings, temporary_settings)

from flows import api_server


def test_a_configured_api_starts_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("started a server although an API URL is configured")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}), api_server.temporary_server() as url:
        assert url is None
        assert get_current_settings().api.url == "http://127.0.0.1:1/api"
        assert get_current_settings().flows.heartbeat_frequency is not None  # a lasting server watches them


def test_the_server_answers_within_the_block_and_is_stopped_after_it(tmp_path, monkeypatch):
    started = []
    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(popen(*a, **k)) or started[-1])
    # the defaults, not the session's Prefect test server (tests/conftest.py), where one runs in this process:
    # its API URL and database URL would otherwise reach the server started here
    with temporary_settings({PREFECT_HOME: tmp_path / "home"},
                            restore_defaults={PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL}):
        heartbeats = get_current_settings().flows.heartbeat_frequency
        with api_server.temporary_server() as url:
            assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
            assert get_current_settings().api.url == url and api_server.healthy(url)
            # no flow-run heartbeats for a server that lives as long as the run (Prefect's default: every 180 s)
            assert get_current_settings().flows.heartbeat_frequency is None
            from prefect import get_client

            with get_client(sync_client=True) as client:  # Prefect's own client talks to it
                assert client.api_healthcheck() is None
        assert get_current_settings().api.url is None
        assert heartbeats is not None and get_current_settings().flows.heartbeat_frequency == heartbeats
    assert len(started) == 1 and started[0].poll() is not None  # stopped, not left running
    assert not api_server.healthy(url)
    assert (tmp_path / "home" / "prefect.db").is_file()  # the run's PREFECT_HOME reached the server


def test_a_server_that_cannot_start_is_left_to_prefect_with_its_reason(monkeypatch, caplog):
    monkeypatch.setattr(api_server, "server_command",
                        lambda port: [sys.executable, "-c", "import sys; sys.exit('no database here')"])
    with temporary_settings(restore_defaults={PREFECT_API_URL}), api_server.temporary_server() as url:
        assert url is None and get_current_settings().api.url is None  # Prefect starts its own, as without us
    assert "exit code 1" in caplog.text and "no database here" in caplog.text


def test_begin_starts_nothing_with_an_api_url_in_the_environment(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("started a server although PREFECT_API_URL is set")

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.setattr(subprocess, "Popen", refuse)
    api_server.begin()
    assert api_server._early is None


def test_an_early_server_never_told_to_serve_exits_without_opening_a_database(tmp_path, monkeypatch):
    """The gate: ``begin``'s process imports Prefect's server, then ends at the end of its input without the
    word; with a configured API, ``temporary_server`` stops it (a dry run: ``cancel``)."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    api_server.begin()
    waiting = api_server._early.process
    waiting.stdin.close()  # as when the run's process exits without using it
    assert waiting.wait(120) == 0
    api_server._early.stderr.close()
    api_server._early = None
    assert not (tmp_path / "home" / "prefect.db").exists()

    api_server.begin()
    unused = api_server._early.process
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}), api_server.temporary_server() as url:
        assert url is None
    assert api_server._early is None and unused.poll() is not None
    assert not (tmp_path / "home" / "prefect.db").exists()


def test_the_run_uses_the_server_begin_started(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    api_server.begin()
    early = api_server._early

    def refuse(*args, **kwargs):
        raise AssertionError("started a second server")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), api_server.temporary_server() as url:
        assert url == f"http://127.0.0.1:{early.port}/api" and api_server.healthy(url)
        assert api_server._early is None  # taken: a later run in this process starts its own
    assert early.process.poll() is not None and not api_server.healthy(url)
    assert (tmp_path / "home" / "prefect.db").is_file()  # begin()'s environment reached the server


def test_a_run_that_ends_before_its_flow_stops_the_early_server(tmp_path, monkeypatch, capsys):
    from flows.finetune import main

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    api_server.begin()
    early = api_server._early.process
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 1  # a bad config: one line, exit 1
    assert "missing.yaml" in capsys.readouterr().err
    assert api_server._early is None and early.poll() is not None
    assert not (tmp_path / "home" / "prefect.db").exists()
