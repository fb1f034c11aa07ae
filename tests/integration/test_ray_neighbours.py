"""Users run the suite on machines where Ray already runs: the tests' Ray instances (the session's local
one, the `ray start` heads of the cluster tests) leave another Ray instance on the machine running, and
the user's ~/.ray/auth_token untouched."""
import os
import subprocess

from ray_head import RAY, USER_TOKEN_AT_START, alive, start_head, stop_head


def _answers(head) -> bool:
    r = subprocess.run([RAY, "status", "--address", head.gcs_address], env=head.env, capture_output=True,
                       text=True, timeout=120)
    return r.returncode == 0


def test_a_bystander_ray_instance_survives_the_tests_heads(ray_local):
    """A bystander head (its own temp dir, ports, HOME, token) runs while the session's local instance
    works and a test head starts and stops (the cluster tests' helpers): its processes stay alive and
    `ray status --address` on it still answers; the bystander is then stopped by PID."""
    token = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    token_before = os.path.getmtime(token) if os.path.exists(token) else None
    bystander = start_head(num_cpus=1, token=True, dashboard=False)
    try:
        pids = bystander.services()
        assert len(pids) >= 3  # GCS, raylet, monitors
        assert ray_local.get(ray_local.put(41)) == 41  # the session's instance: another one, of our own
        assert ray_local.get_runtime_context().gcs_address != bystander.gcs_address
        head = start_head(num_cpus=1, token=True, dashboard=False)  # as the job-submit test does
        assert head.pids().isdisjoint(pids) and head.home != bystander.home
        stop_head(head)
        assert not head.pids() and not os.path.exists(head.temp_dir)
        assert all(alive(p) for p in pids), [p for p in pids if not alive(p)]
        assert _answers(bystander)
    finally:
        stop_head(bystander)
    assert not bystander.pids()
    assert (os.path.getmtime(token) if os.path.exists(token) else None) == token_before  # the user's token


def test_the_session_leaves_the_users_ray_token_alone(ray_local):
    """The session's Ray instance (token mode by default) runs on a token of the session's own: a
    ~/.ray/auth_token that did not exist when the session began still does not (Ray writes one there
    when it starts without a token), and the token the session uses lies outside HOME."""
    assert ray_local.is_initialized()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        assert os.path.isfile(path) and not path.startswith(os.path.expanduser("~") + os.sep)
    if USER_TOKEN_AT_START == [False]:
        assert not os.path.exists(os.path.expanduser("~/.ray/auth_token"))
