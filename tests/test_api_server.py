"""flows/api_server.py: the temporary Prefect server a CLI run starts itself (without importing Prefect's server)."""
import subprocess
import sys

from prefect.settings import PREFECT_API_URL, PREFECT_HOME, get_current_settings, temporary_settings

from flows import api_server


def test_a_configured_api_starts_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("started a server although an API URL is configured")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}), api_server.temporary_server() as url:
        assert url is None
        assert get_current_settings().api.url == "http://127.0.0.1:1/api"


def test_the_server_answers_within_the_block_and_is_stopped_after_it(tmp_path, monkeypatch):
    started = []
    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(popen(*a, **k)) or started[-1])
    with temporary_settings({PREFECT_HOME: tmp_path / "home"}, restore_defaults={PREFECT_API_URL}):
        with api_server.temporary_server() as url:
            assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
            assert get_current_settings().api.url == url and api_server.healthy(url)
            from prefect import get_client

            with get_client(sync_client=True) as client:  # Prefect's own client talks to it
                assert client.api_healthcheck() is None
        assert get_current_settings().api.url is None
    assert len(started) == 1 and started[0].poll() is not None  # stopped, not left running
    assert not api_server.healthy(url)
    assert (tmp_path / "home" / "prefect.db").is_file()  # the run's PREFECT_HOME reached the server


def test_a_server_that_cannot_start_is_left_to_prefect_with_its_reason(monkeypatch, caplog):
    monkeypatch.setattr(api_server, "uvicorn_command",
                        lambda port: [sys.executable, "-c", "import sys; sys.exit('no database here')"])
    with temporary_settings(restore_defaults={PREFECT_API_URL}), api_server.temporary_server() as url:
        assert url is None and get_current_settings().api.url is None  # Prefect starts its own, as without us
    assert "exit code 1" in caplog.text and "no database here" in caplog.text
