"""A migration as a picture: the timeline a vmigrate source records
(`x-vmigrate-query-migrate-timeline`) and `vmigrate report`, which renders it as one
HTML page with SVG charts.

A loaded `none` VM (half its RAM holding data) migrates live to a second vmigrate over TCP at a capped bandwidth, so
that it takes several passes and about a second. Its timeline is read over QMP, saved,
and rendered both from the file and straight from the QMP socket. Checked: the command
is in `query-qmp-schema`; the samples are about 100 ms apart and follow the migration
(bytes sent never go down and end at query-migrate's figure, the passes are those of
`dirty-sync-count`, the stop is there); every SVG of the page parses as XML, has
labelled axes with units and marks the switchover; the page has no script and loads
nothing; its table gives query-migrate's total bytes and downtime.
"""
import json
import re
import subprocess
import xml.etree.ElementTree as ET

import pytest

import harness
from conftest import require

MEM_MIB = 16
LOAD = ["--workload", "hot=2M,rate=1M", "--cpus", "1"]
COMMAND = "x-vmigrate-query-migrate-timeline"
SVG = "{http://www.w3.org/2000/svg}"


def run_vmigrate(*args):
    return subprocess.run([harness.vmigrate_bin(), *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def migrated():
    """(workspace, source, query-migrate, timeline) of one live migration."""
    require("vmigrate")
    ws = harness.Workspace("report")
    try:
        # Half the RAM holds data, so the transfer takes time at the capped bandwidth.
        data = harness.os.urandom(MEM_MIB // 2 * harness.MiB)
        src = ws.vm("vmigrate", "src", mem_mib=MEM_MIB, extra=LOAD).start(prefill=data)
        dst = ws.vm("vmigrate", "dst", mem_mib=MEM_MIB, incoming="defer").start()
        # About a second of transfer: several 100 ms samples and several passes.
        src.set_params(max_bandwidth=10 << 20, downtime_limit=300)
        si, di = harness.migrate(ws, src, dst, "tcp")
        assert si.get("status") == "completed", f"{si}\n{ws.diagnostics()}"
        assert di.get("status") == "completed", f"{di}\n{ws.diagnostics()}"
        # The sampler takes its last sample within one period of the end.
        harness.time.sleep(0.3)
        timeline = src.cmd(COMMAND)
        yield ws, src, si, timeline
    finally:
        ws.cleanup()


def test_command_is_in_the_schema(migrated):
    _, src, _, _ = migrated
    schema = src.cmd("query-qmp-schema")
    assert any(e.get("meta-type") == "command" and e.get("name") == COMMAND
               for e in schema)


def test_timeline_follows_the_migration(migrated):
    _, _, info, t = migrated
    samples = t["samples"]
    assert len(samples) >= 5, samples
    times = [s["t-ms"] for s in samples]
    assert times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # ~100 ms apart; generous bounds for a loaded machine.
    assert 50 <= sorted(gaps)[len(gaps) // 2] <= 400, gaps
    sent = [s["transferred"] for s in samples]
    assert sent == sorted(sent)
    assert sent[-1] == info["ram"]["transferred"]
    assert samples[-1]["status"] == "completed"
    assert max(s["bandwidth"] for s in samples) > 0
    passes = [e["pass"] for e in t["events"] if e["event"] == "pass"]
    assert passes == list(range(1, info["ram"]["dirty-sync-count"] + 1))
    statuses = [e["status"] for e in t["events"] if e["event"] == "status"]
    assert statuses == ["setup", "active", "device", "completed"]
    s = t["summary"]
    assert s["transferred"] == info["ram"]["transferred"]
    assert s["downtime-ms"] == info["downtime"]
    assert s["total-time-ms"] == info["total-time"]


def check_page(path, info):
    with open(path) as f:
        page = f.read()
    assert "<script" not in page.lower()
    # Nothing is fetched: the only address is the SVG namespace.
    assert re.findall(r"https?://[^\"']+", page) == \
        ["http://www.w3.org/2000/svg"] * page.count("<svg ")
    svgs = re.findall(r"<svg .*?</svg>", page, re.S)
    assert len(svgs) >= 3
    for svg in svgs:
        root = ET.fromstring(svg)
        texts = [t.text or "" for t in root.iter(f"{SVG}text")]
        assert "time since migrate (s)" in texts
        assert any(u in texts for u in ("MiB/s", "MiB", "%")), texts
        assert root.findall(f".//{SVG}polyline")
        assert any(r.get("class") == "switchover" for r in root.iter(f"{SVG}rect"))
        assert any(t.startswith("switchover: stop,") for t in texts), texts
    transferred = re.search(r'id="transferred">(\d+) bytes', page)
    assert transferred and int(transferred.group(1)) == info["ram"]["transferred"]
    downtime = re.search(r'id="downtime">(\d+) ms', page)
    assert downtime and int(downtime.group(1)) == info["downtime"]


def test_report_from_a_file(migrated):
    ws, _, info, timeline = migrated
    saved, page = ws.path("timeline.json"), ws.path("page.html")
    with open(saved, "w") as f:
        json.dump(timeline, f)
    r = run_vmigrate("report", saved, "-o", page)
    assert r.returncode == 0, r.stderr
    assert page in r.stdout
    check_page(page, info)


def test_report_from_qmp(migrated):
    ws, src, info, _ = migrated
    page = ws.path("page-qmp.html")
    r = run_vmigrate("report", "--qmp", f"unix:{src.qmp_path}", "-o", page)
    assert r.returncode == 0, r.stderr
    check_page(page, info)


def test_bad_timeline_is_refused(migrated):
    ws, _, _, timeline = migrated
    bad, page = ws.path("bad.json"), ws.path("bad.html")
    del timeline["summary"]
    with open(bad, "w") as f:
        json.dump(timeline, f)
    r = run_vmigrate("report", bad, "-o", page)
    assert r.returncode != 0
    assert "summary" in r.stderr
    assert not harness.os.path.exists(page)
