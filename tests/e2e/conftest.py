import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "harness_check: QEMU to QEMU runs that only check "
                                       "the harness itself (no vmigrate involved)")
    config.addinivalue_line("markers", "vmigrate: runs the vmigrate binary")


def require(*impls):
    """Skip (with the reason) when something this test needs is missing."""
    for reason in (harness.qmp_lib_missing_reason(), harness.shm_missing_reason()):
        if reason:
            pytest.skip(reason)
    if "qemu" in impls:
        reason = harness.qemu_missing_reason()
        if reason:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def session_dir():
    reason = harness.shm_missing_reason()
    if reason:
        pytest.skip(reason)
    d = tempfile.mkdtemp(prefix="vme2e-session-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def image(session_dir):
    """256 MiB mixed guest-RAM image, made once per session."""
    return harness.Image(os.path.join(session_dir, "image256.bin"), 256 * harness.MiB, 1)


@pytest.fixture(scope="session")
def big_image(session_dir):
    """512 MiB mixed guest-RAM image for the interrupted-migration tests."""
    return harness.Image(os.path.join(session_dir, "image512.bin"), 512 * harness.MiB, 2)


@pytest.fixture(scope="session")
def small_image(session_dir):
    """16 MiB mixed guest-RAM image for the stream-corruption tests."""
    return harness.Image(os.path.join(session_dir, "image16.bin"), 16 * harness.MiB, 3)


@pytest.fixture
def ws(request):
    """Per-test workspace: temp dirs and every process the test starts. Processes are
    killed and dirs removed at teardown, pass or fail."""
    reason = harness.shm_missing_reason()
    if reason:
        pytest.skip(reason)
    w = harness.Workspace(request.node.name)
    yield w
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and w.machines:
        sys.stderr.write("\n" + w.diagnostics() + "\n")
    w.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """x509 test credentials (a CA, server and client certificates) for the TLS tests."""
    import tls_certs
    try:
        return tls_certs.make_pki(str(tmp_path_factory.mktemp("pki")))
    except (OSError, RuntimeError) as e:
        pytest.skip(f"cannot make test certificates with openssl: {e}")
