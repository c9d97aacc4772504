"""Shared fixtures: a tiny random VideoMAE checkpoint, sample videos, one owned local Ray for the session."""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3server"]

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "videoindex" / "samples"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The whole run's limit, far above its length and below CI's 90 minutes: a hang outside any test's own
# timeout (a session fixture's teardown, a process that never exits) ends the run with every thread's stack
# on stderr instead of running silently into CI's limit.
SUITE_WATCHDOG_S = float(os.environ.get("VIDEOINDEX_TEST_WATCHDOG_S", 45 * 60))


# Run in one worker under pytest-xdist (the README command runs ``-n 2``), in this order: every test that
# starts a Ray, and the browser tests. Two Rays on 2 cores starve each other, and Chromium must never run
# beside a Ray (tests/test_report.py: browser). The order: the tests on the shared Ray one after another
# (one start of it), the tests with Rays of their own, the multi-node fault tests (2-3x as long beside
# the other worker's tests, a removed node 39 s instead of 12: they start about when that worker is
# done), then the browser tests, after every Ray of the run has stopped. Prefixes of node ids, because
# xdist's scheduler sees only those; the collection check below keeps them in step with the markers.
ONE_WORKER = (
    "tests/test_cli.py::test_run_then_status",
    "tests/test_s3.py::test_s3_to_s3",
    "tests/test_ray_executor.py::",  # the shared Ray, then Rays of their own
    "tests/test_submit.py::",
    "tests/test_faults.py::",
    "tests/test_report.py::test_report_in_browser",
)
ONE_WORKER_MARKS = ("ray", "multinode", "browser")


def _xdist_rank(item: pytest.Item) -> int:
    """0 for a test outside ONE_WORKER, else 1 + the position of its prefix there."""
    return next((n + 1 for n, prefix in enumerate(ONE_WORKER) if item.nodeid.startswith(prefix)), 0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects, and sorts, the same way
        items.sort(key=_xdist_rank)  # stable: otherwise as collected
    stray = [item.nodeid for item in items
             if any(item.get_closest_marker(m) for m in ONE_WORKER_MARKS) and not item.nodeid.startswith(ONE_WORKER)]  # fmt: skip
    if stray:
        raise pytest.UsageError(f"tests marked {'/'.join(ONE_WORKER_MARKS)} must be in tests/conftest.py "
                                f"ONE_WORKER: {', '.join(stray)}")  # fmt: skip


@pytest.fixture(autouse=True)
def _ray_only_in_one_worker(request: pytest.FixtureRequest):
    """A test outside ONE_WORKER that starts a Ray in this process fails: under xdist it would run beside
    the other worker's Ray (and perhaps beside Chromium). Serially a Ray left by an earlier test is fine."""

    def running() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = running()
    yield
    if not before and running() and not request.node.nodeid.startswith(ONE_WORKER):
        sys.modules["ray"].shutdown()
        pytest.fail("this test started a Ray: mark it ray (or multinode) and add it to ONE_WORKER in "
                    "tests/conftest.py")  # fmt: skip


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """With ``-n N`` (xdist's default "load"): the ONE_WORKER tests as one unit, every other test alone."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerForRay(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "one worker: Ray, then the browser" if nodeid.startswith(ONE_WORKER) else nodeid

    return OneWorkerForRay(config, log)


def pytest_configure(config: pytest.Config) -> None:
    # fd 2 is the terminal here (pytest suspends its capture before configure); a dup outlives capture.
    faulthandler.dump_traceback_later(SUITE_WATCHDOG_S, exit=True, file=os.dup(2))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tinymodel import make_tiny_videomae

    return make_tiny_videomae(tmp_path_factory.mktemp("tiny-videomae"))


class _RayOwner:
    """The test session's local Ray: started on first use, as ``videoindex run`` starts one, stopped when
    the session ends. A test that needs a Ray of its own (another system config, a dashboard, a multi-node
    cluster) takes ``own_ray``: the shared one stops for it and the next ``ray_session`` user restarts it."""

    def __init__(self) -> None:
        self.shared = False
        self.metrics_port = 0

    def shared_ray(self):
        import ray

        from tests.helpers import free_ports
        from videoindex.executors.ray_executor import ray_system_config

        if not (self.shared and ray.is_initialized()):
            self.stop()
            self.metrics_port, dashboard_port = free_ports(2)
            ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=dashboard_port,
                     _metrics_export_port=self.metrics_port, logging_level="WARNING", log_to_driver=False,
                     _system_config={**ray_system_config(), "metrics_report_interval_ms": 1000})  # fmt: skip
            self.shared = True
        return ray

    def stop(self) -> None:
        import sys

        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        self.shared = False


@pytest.fixture(scope="session")
def _ray_owner():
    owner = _RayOwner()
    yield owner
    owner.stop()


@pytest.fixture()
def ray_session(_ray_owner: _RayOwner):
    """The shared local Ray: 2 CPUs, the system config videoindex gives a local Ray, a dashboard (Ray's
    state API, as on a cluster) and metrics exported every second on ``_ray_owner.metrics_port``."""
    return _ray_owner.shared_ray()


@pytest.fixture()
def own_ray(_ray_owner: _RayOwner):
    """A Ray of this test's own: call ``own_ray(**ray_init_options)``; it is shut down after the test."""
    import ray

    def start(**options):
        _ray_owner.stop()
        ray.init(**{"logging_level": "WARNING", "log_to_driver": False, **options})
        return ray

    _ray_owner.stop()
    yield start
    _ray_owner.stop()


@pytest.fixture()
def sample_videos(tmp_path: Path) -> Path:
    """Two small real sample videos in their own input directory."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("demo.mp4", "carphone_pristine.mp4"):
        shutil.copy(SAMPLES / name, folder / name)
    return folder
