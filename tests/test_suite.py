"""The suite's own set-up (tests/conftest.py): what keeps it short on every core."""
import os

import pytest


@pytest.fixture(scope="module")
def made_once():
  return os.getpid()


def test_tests_that_share_a_module_fixture_run_in_one_xdist_worker(made_once, request):
  """Under pytest-xdist (--dist loadgroup), a test using a module-scoped fixture
  carries its file's group in its node id, which sends the file's users of such
  fixtures to one worker, where the fixture is made once."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    pytest.skip("runs under pytest-xdist only (the README's test command; not with -n 0)")
  assert request.node.nodeid.endswith("@tests/test_suite.py"), request.node.nodeid
  assert made_once == os.getpid()
