"""Tests and fault drills stop only what they started: a Ray temp dir is matched as a path."""

from sertune.testing import names_path


def test_a_temp_dir_is_matched_as_a_path_not_a_substring():
    assert names_path("ray start --temp-dir=/tmp/rw1 --block", "/tmp/rw1")
    assert names_path("raylet --raylet_socket_name=/tmp/rw1/session_2/sockets/raylet", "/tmp/rw1")
    assert names_path("gcs_server --log_dir='/tmp/rw1/session_2/logs'", "/tmp/rw1/")
    assert not names_path("ray start --temp-dir=/tmp/rw12 --block", "/tmp/rw1")
    assert not names_path("raylet --raylet_socket_name=/tmp/rw12/session_2/sockets", "/tmp/rw1")
    assert not names_path("python /tmp/rw1x/script.py", "/tmp/rw1")
