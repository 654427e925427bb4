"""Decrypted Docker TLS client keys live in a private directory under the state directory, never in a
predictable shared one; a directory someone else owns or can read is refused."""

import os
import stat

import pytest

from llmhub.fleet import engine

CREDS = engine.TlsCredentials(ca_cert="CA PEM", client_cert="CERT PEM", client_key="-----KEY PEM-----")


@pytest.fixture
def state_dir(tmp_path, settings):
    settings.STATE_DIR = tmp_path / "state"
    settings.STATE_DIR.mkdir(mode=0o700)
    return settings.STATE_DIR


def test_the_client_key_is_written_privately_under_the_state_directory(state_dir):
    config = engine._tls_config(CREDS)

    cert, key = config.cert
    assert os.path.commonpath([key, str(state_dir)]) == str(state_dir)
    directory = os.path.dirname(key)
    for path in (directory, os.path.dirname(directory)):
        mode = os.stat(path).st_mode
        assert stat.S_IMODE(mode) == 0o700 and os.stat(path).st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert open(key).read() == CREDS.client_key


def test_a_directory_others_can_enter_is_refused(state_dir):
    engine._tls_config(CREDS)
    tls_dir = state_dir / engine.TLS_DIR_NAME
    tls_dir.chmod(0o755)

    with pytest.raises(engine.EngineError, match="group or others"):
        engine._tls_config(CREDS)


def test_a_directory_owned_by_someone_else_is_refused(state_dir):
    """Runs as root (as CI does): only root can give a directory away."""
    tls_dir = state_dir / engine.TLS_DIR_NAME
    tls_dir.mkdir(mode=0o700)
    os.chown(tls_dir, 65534, 65534)  # nobody

    with pytest.raises(engine.EngineError, match="owned by"):
        engine._tls_config(CREDS)
