"""`processes.Supervisor`'s restart schedule under a controlled clock: a process that keeps exiting at once is
started again after 1, 2, 4, 8, 16, 30, 30 s (never sooner: no busy loop), the count starts again from 1 s
once a process stayed up STABLE_AFTER seconds, each exit is said, and the other processes are left alone."""

import pytest

from llmhub import processes


class FakeChild:
    """Stands for a subprocess.Popen: `exit(code)` makes it look exited."""

    pids = iter(range(10_000_000, 20_000_000))

    def __init__(self, argv):
        self.argv, self.pid, self.returncode = argv, next(self.pids), None

    def poll(self):
        return self.returncode

    def exit(self, code):
        self.returncode = code


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def supervisor(monkeypatch, tmp_path):
    """A Supervisor of `web` and `worker` whose children are FakeChild and whose clock the test moves."""
    killed = []
    monkeypatch.setattr(processes, "start", lambda commands, **_: [FakeChild(argv) for argv in commands.values()])
    monkeypatch.setattr(processes.os, "killpg", lambda pid, sig: killed.append(pid))
    said, clock = [], Clock()
    sup = processes.Supervisor({"web": ["web"], "worker": ["worker"]}, log_dir=tmp_path, say=said.append, clock=clock)
    sup.start()
    sup.said, sup.clock_, sup.killed = said, clock, killed
    return sup


def crash_and_restart(sup, name: str, *, code: int = -9) -> float:
    """Make `name` exit, let the supervisor see it; return the delay it announced after checking it is not
    restarted a moment before and is restarted right at that delay."""
    child = sup.children[name]
    child.exit(code)
    sup.check()
    delay = float(sup.said[-1].split("restarting it in ")[1].split(" s")[0])
    sup.clock_.now += delay - 0.01
    sup.check()
    sup.check()  # checking often does not bring the restart forward
    assert sup.children[name] is child, "restarted before its delay"
    sup.clock_.now += 0.01
    sup.check()
    assert sup.children[name] is not child and sup.children[name].poll() is None
    assert sup.said[-1] == f"{name} restarted (pid {sup.children[name].pid})"
    return delay


def test_a_process_that_keeps_exiting_at_once_backs_off_up_to_30_s(supervisor):
    delays = [crash_and_restart(supervisor, "worker") for _ in range(8)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert "worker exited (signal 9); restarting it in 1 s (restart 1;" in supervisor.said[0]
    assert "worker exited (signal 9); restarting it in 30 s (restart 8;" in supervisor.said[-2]


def test_the_backoff_starts_again_after_a_process_stayed_up(supervisor):
    assert [crash_and_restart(supervisor, "worker") for _ in range(3)] == [1, 2, 4]
    supervisor.clock_.now += processes.STABLE_AFTER - 1  # up not quite long enough: the backoff goes on
    assert crash_and_restart(supervisor, "worker") == 8
    supervisor.clock_.now += processes.STABLE_AFTER
    assert crash_and_restart(supervisor, "worker") == 1
    assert "(restart 1;" in supervisor.said[-2]


def test_an_exit_code_is_said_and_each_process_has_its_own_backoff(supervisor):
    web = supervisor.children["web"]
    assert crash_and_restart(supervisor, "worker", code=1) == 1
    assert "worker exited (code 1); restarting it in 1 s" in supervisor.said[0]
    assert crash_and_restart(supervisor, "worker") == 2
    assert crash_and_restart(supervisor, "web") == 1  # the worker's crashes do not lengthen the web's wait
    assert web.pid in supervisor.killed


def test_the_others_are_left_running_while_one_waits_for_its_restart(supervisor):
    web = supervisor.children["web"]
    worker = supervisor.children["worker"]
    worker.exit(-9)
    supervisor.check()
    assert supervisor.killed == [worker.pid]  # only the dead one's process group is cleaned up
    for _ in range(5):
        supervisor.check()
    assert supervisor.children["web"] is web and supervisor.killed == [worker.pid]
    assert len([line for line in supervisor.said if "exited" in line]) == 1  # said once, not at every check
