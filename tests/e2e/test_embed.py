"""rust-vmm embedding: `cargo run --release --example embed` builds guest memory with
vm-memory, hands its regions to the engine as RAM blocks (cargo feature `vm-memory`),
migrates live to a second instance of itself over a unix socket while a thread writes
guest memory through vm-memory, and compares the destination's memory with its own."""
import re
import shutil
import subprocess

import pytest

import harness


def test_embed_example_migrates_vm_memory_live():
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is not installed: the example cannot be built")
    build = subprocess.run([cargo, "build", "--release", "--example", "embed"],
                           cwd=harness.REPO, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    exe = harness.REPO / "target" / "release" / "examples" / "embed"
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr[-3000:])
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    m = re.search(r"\((\d+) passes.*made (\d+) writes; the copy is identical "
                  r"\(digest ([0-9a-f]{16}) / ([0-9a-f]{16})\)", lines[0])
    assert m, lines[0]
    passes, writes, src, dst = m.groups()
    assert src == dst
    # Live: the guest wrote while the migration ran, over more than one pass.
    assert int(writes) > 0 and int(passes) >= 2, lines[0]
