"""QMP and HMP conformance: QEMU 10.0.2 and vmigrate get the same scripts of monitor
commands, side by side, and must give the same replies: same success or failure, same
error class, same text, and the same return values where they do not depend on the
process (versions, times, ports).

Where vmigrate lacks a feature it answers with its own clear error instead; every such
case is listed in the block at the top (VMIGRATE_ONLY, QEMU_ONLY and the functions next
to them), and nowhere else.

Also here: QEMU's own asyncio client (`qemu.qmp.QMPClient`) driving vmigrate, hostile
QMP input (bad JSON, huge messages, many clients, clients that vanish mid-command) and
the MIGRATION/MIGRATION_PASS event sequence of a precopy run compared with QEMU's."""
import asyncio
import json
import os
import socket
import threading
import time

import pytest

import harness
from conftest import require
from rawqmp import RawQMP

pytestmark = pytest.mark.vmigrate

CAPABILITIES = [
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
    "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
    "switchover-ack", "dirty-limit", "mapped-ram",
]

# ------------------------------------------------------------------------------------
# The one place where vmigrate is expected to differ from QEMU 10.0.2.

# Capabilities whose feature vmigrate does not have yet. A capability change that QEMU
# accepts and that turns one of them on gets, from vmigrate, the error
# "Capability 'X' is not supported by vmigrate yet" for the first such X in the request
# (QEMU's own compatibility rules are applied before, so pairs QEMU refuses get QEMU's
# error from vmigrate too).
UNSUPPORTED_CAPABILITIES = [
    "xbzrle", "rdma-pin-all", "auto-converge", "return-path", "multifd",
    "dirty-bitmaps", "postcopy-blocktime",
    "zero-copy-send", "switchover-ack", "mapped-ram",
]

# Commands (as sent, in compact JSON) whose vmigrate reply is an error with this text,
# whatever QEMU answers.  QEMU_SKIP: not sent to QEMU at all (QEMU crashes on them).
VMIGRATE_ONLY = {
    # QEMU 10.0.2 segfaults on a channel list without a main entry; the message it
    # meant to give is this one.
    '{"execute": "migrate", "arguments": {"channels": [{"channel-type": "cpr", "addr": '
    '{"transport": "socket", "type": "unix", "path": "/nonexistent/cpr.sock"}}]}}':
        "Channel list has no main entry",
}
QEMU_SKIP = {
    '{"execute": "migrate", "arguments": {"channels": [{"channel-type": "cpr", "addr": '
    '{"transport": "socket", "type": "unix", "path": "/nonexistent/cpr.sock"}}]}}',
}

# Commands sent to QEMU only, with the error QEMU must give: states vmigrate cannot
# reach because it refuses the capability involved (the texts are vmigrate's too).
CPR_CONFLICTS = {
    "dirty-bitmaps": "Cannot use postcopy with CPR",
    "background-snapshot": "Cannot use background snapshot with CPR",
}
QEMU_ONLY = {
    json.dumps({"execute": "migrate", "arguments": {"uri": f"file:@CPR_FILE@-{cap}"}}): text
    for cap, text in CPR_CONFLICTS.items()
}


# vmigrate's own migration parameters, named so that QEMU will never take the names, with
# their defaults. query-migrate-parameters and the schema list them; the side-by-side
# comparison leaves them out of vmigrate's replies as long as they hold the default
# (the scripts never set them). HMP `info migrate_parameters` prints QEMU's list only.
VMIGRATE_ONLY_PARAMETERS = {"x-vmigrate-postcopy-after": 0}


def without_vmigrate_only_parameters(ret):
    """A query-migrate-parameters return value without vmigrate's own members at their
    defaults (a changed value stays and shows as a difference)."""
    if not isinstance(ret, dict) or "announce-initial" not in ret:
        return ret
    return {k: v for k, v in ret.items()
            if not (k in VMIGRATE_ONLY_PARAMETERS and v == VMIGRATE_ONLY_PARAMETERS[k])}


# HMP lines whose vmigrate output differs, and the output vmigrate must give.
def vmigrate_hmp_expected(line, unsupported):
    words = line.split()
    if words[:1] == ["migrate_set_capability"] and len(words) == 3 and words[2] == "on" \
            and words[1] in unsupported:
        return f"Error: Capability '{words[1]}' is not supported by vmigrate yet\r\n"
    return None


def vmigrate_expected(key, msg, qemu_reply, unsupported):
    """The error text vmigrate must give instead of QEMU's reply, or None when it must
    give QEMU's reply.  UNSUPPORTED: the capabilities this vmigrate refuses (a subset
    of UNSUPPORTED_CAPABILITIES; features that land leave the list)."""
    if key in VMIGRATE_ONLY:
        return VMIGRATE_ONLY[key]
    if "return" in qemu_reply and msg.get("execute") == "migrate-set-capabilities":
        for item in msg["arguments"]["capabilities"]:
            if item["state"] and item["capability"] in unsupported:
                return f"Capability '{item['capability']}' is not supported by vmigrate yet"
    return None


# Differences that belong to URI parsing in the engine's transport module, kept apart
# (as an expected failure) until that module is fixed: (uri, QEMU's error).
URI_PARSE_DIFFERENCES = [
    ("tcp:127.0.0.1:4444,to=x", "error parsing to= argument"),
    ("file:/tmp/x,offset=-1", "file URI has bad offset -1: Numerical result out of range"),
]


def probe_unsupported(v):
    """The capabilities vmigrate refuses as not supported yet, found by asking it."""
    needs = {"zero-copy-send": ["multifd"], "postcopy-preempt": ["postcopy-ram"],
             "switchover-ack": ["return-path"]}
    found = set()
    for c in CAPABILITIES:
        r = v.send(caps(c, *needs.get(c, [])))
        desc = r.get("error", {}).get("desc", "")
        if desc == f"Capability '{c}' is not supported by vmigrate yet":
            found.add(c)
        v.send(ALL_CAPS_OFF)
    extra = found - set(UNSUPPORTED_CAPABILITIES)
    assert not extra, f"vmigrate refuses capabilities it used to support: {extra}"
    return found

# ------------------------------------------------------------------------------------


def cmd(name, **args):
    m = {"execute": name}
    if args:
        m["arguments"] = args
    return m


def caps(*pairs, state=True):
    return cmd("migrate-set-capabilities",
               capabilities=[{"capability": c, "state": state} for c in pairs])


ALL_CAPS_OFF = caps(*CAPABILITIES, state=False)
DEFAULT_PARAMS = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5,
    "announce-step": 100, "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10, "cpu-throttle-tailslow": False, "max-cpu-throttle": 99,
    "tls-creds": "", "tls-hostname": "", "tls-authz": "", "max-bandwidth": 134217728,
    "avail-switchover-bandwidth": 0, "downtime-limit": 300, "x-checkpoint-delay": 20000,
    "multifd-channels": 2, "multifd-compression": "none", "multifd-zlib-level": 1,
    "multifd-qatzip-level": 1, "multifd-zstd-level": 1, "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0, "x-vcpu-dirty-limit-period": 1000,
    "vcpu-dirty-limit": 1, "mode": "normal", "zero-page-detection": "multifd",
    "direct-io": False,
}
RESET_PARAMS = cmd("migrate-set-parameters", **DEFAULT_PARAMS)

U64 = ["announce-initial", "announce-max", "announce-rounds", "announce-step",
       "max-bandwidth", "avail-switchover-bandwidth", "downtime-limit",
       "xbzrle-cache-size", "max-postcopy-bandwidth", "x-vcpu-dirty-limit-period",
       "vcpu-dirty-limit"]
U8 = ["throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment",
      "max-cpu-throttle", "multifd-channels", "multifd-zlib-level",
      "multifd-qatzip-level", "multifd-zstd-level"]
BOOLS = ["cpu-throttle-tailslow", "direct-io"]
TLS = ["tls-creds", "tls-hostname", "tls-authz"]
ENUMS = {"multifd-compression": ["none", "zlib", "zstd", "qatzip", "lz4"],
         "mode": ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec", "", "NORMAL",
                  "cpr_reboot"],
         "zero-page-detection": ["none", "legacy", "multifd", "bogus"]}
EDGES = {
    "throttle-trigger-threshold": [0, 1, 100, 101],
    "cpu-throttle-initial": [0, 1, 99, 100],
    "cpu-throttle-increment": [0, 1, 99, 100],
    "max-cpu-throttle": [0, 19, 20, 99, 100],
    "multifd-channels": [0, 1, 255],
    "multifd-zlib-level": [0, 9, 10],
    "multifd-qatzip-level": [0, 1, 9, 10],
    "multifd-zstd-level": [0, 20, 21],
    "downtime-limit": [0, 2000000, 2000001, -1],
    "announce-initial": [0, 100000, 100001],
    "announce-max": [100000, 100001],
    "announce-rounds": [1000, 1001],
    "announce-step": [0, 1, 10000, 10001],
    "xbzrle-cache-size": [0, 4095, 4096, 8192, 12288, 1 << 40, -1],
    "x-vcpu-dirty-limit-period": [0, 1, 1000, 1001],
    "vcpu-dirty-limit": [0, 1, 2],
    "max-bandwidth": [0, 1, -1, -5, 1 << 63],
    "avail-switchover-bandwidth": [0, -1],
    "max-postcopy-bandwidth": [-5],
    "x-checkpoint-delay": [0, 4294967295, 4294967296, -1],
}


def parameter_script():
    s = [cmd("query-migrate-parameters")]
    bad_types = ["x", 1.5, True, None, [], {}, 18446744073709551616]
    for p in U64:
        for v in bad_types:
            s.append(cmd("migrate-set-parameters", **{p: v}))
    for p in U8:
        for v in bad_types + [256, -1, 1 << 40]:
            s.append(cmd("migrate-set-parameters", **{p: v}))
    for v in bad_types + [4294967296]:
        s.append(cmd("migrate-set-parameters", **{"x-checkpoint-delay": v}))
    for p in BOOLS:
        for v in [True, False, "on", 1, None]:
            s.append(cmd("migrate-set-parameters", **{p: v}))
            s.append(RESET_PARAMS)
    for p in TLS:
        for v in [None, "", "tls0", 1, True, [], {}]:
            s.append(cmd("migrate-set-parameters", **{p: v}))
            s.append(cmd("query-migrate-parameters"))
            s.append(RESET_PARAMS)
    for p, values in ENUMS.items():
        for v in values + [1, None, True]:
            s.append(cmd("migrate-set-parameters", **{p: v}))
            s.append(RESET_PARAMS)
    for p, values in EDGES.items():
        for v in values:
            s.append(cmd("migrate-set-parameters", **{p: v}))
            s.append(cmd("query-migrate-parameters"))
            s.append(RESET_PARAMS)
    s += [
        cmd("migrate-set-parameters"),
        cmd("migrate-set-parameters", nope=1),
        cmd("migrate-set-parameters", **{"max-bandwidth": 1, "nope": 1}),
        cmd("migrate-set-parameters", **{"nope": 1, "max-bandwidth": "x"}),
        cmd("migrate-set-parameters", **{"downtime-limit": 2000001, "multifd-channels": 0}),
        cmd("migrate-set-parameters", **{"cpu-throttle-initial": 99,
                                         "max-cpu-throttle": 50}),
        # a change to one member rejected for another's sake (merged set)
        cmd("migrate-set-parameters", **{"max-cpu-throttle": 30}),
        cmd("migrate-set-parameters", **{"cpu-throttle-initial": 40}),
        RESET_PARAMS,
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": []}),
        cmd("query-migrate-parameters"),
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": 1}),
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": [1]}),
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": [{}]}),
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
            {"node-name": "n", "alias": "a", "bitmaps": []}]}),
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
            {"node-name": "n", "alias": "a", "bitmaps": []},
            {"node-name": "n", "alias": "b", "bitmaps": []}]}),
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
            {"node-name": "n", "alias": "a", "bitmaps": []},
            {"node-name": "m", "alias": "a", "bitmaps": []}]}),
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
            {"node-name": "n", "alias": "a b", "bitmaps": []}]}),
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
            {"node-name": "n", "alias": "a", "bitmaps": [
                {"name": "b", "alias": "c"}, {"name": "b", "alias": "d"}]}]}),
        cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
            {"node-name": "n", "alias": "a", "bitmaps": [
                {"name": "b", "alias": "c", "transform": {"persistent": True}}]}]}),
        cmd("query-migrate-parameters"),
        RESET_PARAMS,
        cmd("query-migrate-parameters"),
    ]
    return s


def capability_script():
    s = [cmd("query-migrate-capabilities")]
    for c in CAPABILITIES:
        s.append(caps(c))
        s.append(ALL_CAPS_OFF)
        s.append(cmd("query-migrate-capabilities"))
    for i, a in enumerate(CAPABILITIES):
        for b in CAPABILITIES[i + 1:]:
            s += [caps(a, b), ALL_CAPS_OFF]
    s += [
        caps("dirty-limit", "auto-converge"), ALL_CAPS_OFF,
        caps("return-path", "switchover-ack"), ALL_CAPS_OFF,
        caps("postcopy-ram", "postcopy-preempt"), ALL_CAPS_OFF,
        caps("multifd", "zero-copy-send"), ALL_CAPS_OFF,
        caps("multifd", "zero-copy-send", "xbzrle"), ALL_CAPS_OFF,
        caps("xbzrle", "pause-before-switchover", "multifd"), ALL_CAPS_OFF,
        caps("events"), caps("events"), caps("events", state=False),
        # duplicates: the last one wins
        cmd("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True},
            {"capability": "events", "state": False}]),
        cmd("query-migrate-capabilities"),
        cmd("migrate-set-capabilities", capabilities=[]),
        cmd("migrate-set-capabilities"),
        cmd("migrate-set-capabilities", capabilities={}),
        cmd("migrate-set-capabilities", capabilities=None),
        cmd("migrate-set-capabilities", capabilities="events"),
        cmd("migrate-set-capabilities", capabilities=[1]),
        cmd("migrate-set-capabilities", capabilities=[{}]),
        cmd("migrate-set-capabilities", capabilities=[{"capability": "events"}]),
        cmd("migrate-set-capabilities", capabilities=[{"state": True}]),
        cmd("migrate-set-capabilities", capabilities=[{"capability": 1, "state": True}]),
        cmd("migrate-set-capabilities", capabilities=[{"capability": "events",
                                                        "state": "on"}]),
        cmd("migrate-set-capabilities", capabilities=[{"capability": "events",
                                                        "state": None}]),
        cmd("migrate-set-capabilities", capabilities=[{"capability": "nosuch",
                                                        "state": True}]),
        cmd("migrate-set-capabilities", capabilities=[{"capability": "compress",
                                                        "state": True}]),
        cmd("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True, "extra": 1}]),
        cmd("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True}, {"capability": "bogus"}]),
        cmd("migrate-set-capabilities", capabilities=[], extra=1),
        cmd("migrate-set-capabilities", extra=1, capabilities=1),
        cmd("query-migrate-capabilities"),
    ]
    return s


def state_script(cpr_file, missing_dir):
    """Commands that depend on state, on a VM started without -incoming."""
    bad_uris = [
        "", "foo:bar", "127.0.0.1:4444", "tcp:", "tcp:127.0.0.1", "tcp:[::1",
        "tcp:127.0.0.1:notaport", "unix:", "fd:", "vsock:",
        "vsock:1", "fd:nosuchfd", "fd:3", "file:", f"file:{missing_dir}/f",
        "file:/tmp/x,offset=abc", "exec", "TCP:1.2.3.4:5",
        "rdma:127.0.0.1:4444",
    ]
    ch = lambda addr, t="main": {"channel-type": t, "addr": addr}  # noqa: E731
    unix = {"transport": "socket", "type": "unix", "path": "/nonexistent/cpr.sock"}
    s = [
        cmd("query-migrate"),
        cmd("query-status"),
        cmd("query-migrationthreads"),
        cmd("migrate-continue", state="pre-switchover"),
        cmd("migrate-continue", state="active"),
        cmd("migrate-continue", state="none"),
        cmd("migrate-continue", state="bogus"),
        cmd("migrate-continue", state=1),
        cmd("migrate-continue"),
        cmd("migrate-pause"),
        cmd("migrate-pause", x=1),
        cmd("migrate-recover", uri="tcp:127.0.0.1:4444"),
        cmd("migrate-recover"),
        cmd("migrate-recover", uri=1),
        cmd("migrate-start-postcopy"),
        cmd("migrate_cancel"),
        cmd("migrate_cancel", x=1),
        cmd("migrate-incoming", uri="tcp:127.0.0.1:0"),
        cmd("migrate-incoming", uri="bogus:"),
        cmd("migrate-incoming"),
        cmd("migrate", uri="tcp:127.0.0.1:1", resume=True),
        cmd("migrate", uri="foo:bar", resume=True),
        cmd("migrate"),
        cmd("migrate", uri="tcp:127.0.0.1:1", channels=[ch({"transport": "socket",
            "type": "inet", "host": "127.0.0.1", "port": "1"})]),
        cmd("migrate", uri="foo:bar", channels=[]),
        cmd("migrate", channels=[]),
        cmd("migrate", uri=1),
        cmd("migrate", uri=None),
        cmd("migrate", uri="tcp:127.0.0.1:1", detach="yes"),
        cmd("migrate", uri="tcp:127.0.0.1:1", resume=1),
        cmd("migrate", uri="tcp:127.0.0.1:1", blk=True),
        cmd("migrate", channels={}),
        cmd("migrate", channels=[1]),
        cmd("migrate", channels=[{}]),
        cmd("migrate", channels=[{"channel-type": "main"}]),
        cmd("migrate", channels=[{"channel-type": "bogus", "addr": unix}]),
        cmd("migrate", channels=[ch({})]),
        cmd("migrate", channels=[ch({"transport": "bogus"})]),
        cmd("migrate", channels=[ch({"transport": "socket"})]),
        cmd("migrate", channels=[ch({"transport": "socket", "type": "bogus"})]),
        cmd("migrate", channels=[ch({"transport": "socket", "type": "inet"})]),
        cmd("migrate", channels=[ch({"transport": "socket", "type": "inet",
                                     "host": "127.0.0.1"})]),
        cmd("migrate", channels=[ch({"transport": "socket", "type": "inet",
                                     "host": "127.0.0.1", "port": 1})]),
        cmd("migrate", channels=[ch({"transport": "socket", "type": "unix"})]),
        cmd("migrate", channels=[ch({"transport": "socket", "type": "fd"})]),
        cmd("migrate", channels=[ch({"transport": "socket", "type": "fd",
                                     "str": "nosuchfd"})]),
        cmd("migrate", channels=[ch({"transport": "exec"})]),
        cmd("migrate", channels=[ch({"transport": "exec", "args": "true"})]),
        cmd("migrate", channels=[ch({"transport": "file", "filename": "/tmp/x"})]),
        cmd("migrate", channels=[ch({"transport": "file", "filename": "/tmp/x",
                                     "offset": "0x1000"})]),
        cmd("migrate", channels=[ch({"transport": "file", "filename": "/tmp/x",
                                     "offset": -1, "extra": 1})]),
        cmd("migrate", channels=[ch({"transport": "file",
                                     "filename": f"{missing_dir}/f", "offset": 0})]),
        cmd("migrate", channels=[ch(unix), ch(unix)]),
        cmd("migrate", channels=[ch(unix, "cpr"), ch(unix, "cpr")]),
        cmd("migrate", channels=[ch(unix, "cpr")]),
    ]
    for u in bad_uris:
        # some fail only once started (QEMU resolves addresses asynchronously)
        s += [cmd("migrate", uri=u), "WAIT_IDLE"]
    for u in bad_uris[:-1]:
        s.append(cmd("migrate-incoming", uri=u))
    s += [
        # a migration that fails asynchronously: connection refused
        cmd("migrate", uri="tcp:127.0.0.1:1"),
        "WAIT_FAILED",
        cmd("query-migrate"),
        cmd("migrate-continue", state="failed"),
        cmd("migrate-start-postcopy"),
        cmd("migrate-pause"),
        cmd("migrate_cancel"),
        cmd("query-migrationthreads"),
        # vCPU dirty limits: no KVM dirty ring
        cmd("set-vcpu-dirty-limit"),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 100}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 0}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": -1}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": "x"}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 1.5}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 18446744073709551616}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 100, "cpu-index": 0}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 100, "cpu-index": 99}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 100, "cpu-index": -1}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 100, "cpu-index": "x"}),
        cmd("set-vcpu-dirty-limit", **{"dirty-rate": 100, "x": 1}),
        cmd("cancel-vcpu-dirty-limit"),
        cmd("cancel-vcpu-dirty-limit", **{"cpu-index": 0}),
        cmd("cancel-vcpu-dirty-limit", **{"cpu-index": 99}),
        cmd("cancel-vcpu-dirty-limit", **{"cpu-index": -1}),
        cmd("cancel-vcpu-dirty-limit", **{"cpu-index": "x"}),
        cmd("cancel-vcpu-dirty-limit", x=1),
        cmd("query-vcpu-dirty-limit"),
        cmd("query-vcpu-dirty-limit", x=1),
        # modes: cpr-transfer (RAM here is not shared, so QEMU blocks it)
        cmd("migrate-set-parameters", mode="cpr-transfer"),
        cmd("query-migrate"),
        cmd("migrate", uri="tcp:127.0.0.1:1"),
        cmd("migrate", uri=f"file:{cpr_file}"),
        cmd("migrate", channels=[ch({"transport": "file", "filename": cpr_file,
                                     "offset": 0})]),
        cmd("migrate", channels=[ch({"transport": "file", "filename": cpr_file,
                                     "offset": 0}), ch(unix, "cpr")]),
        cmd("migrate", channels=[ch(unix), ch(unix, "cpr")]),
        cmd("migrate", channels=[ch(unix), ch({"transport": "socket", "type": "inet",
                                               "host": "127.0.0.1", "port": "1"}, "cpr")]),
        cmd("migrate", channels=[ch(unix)]),
        cmd("migrate-set-parameters", mode="normal"),
        cmd("query-migrate"),
        # cpr-reboot: QEMU's checks, in its order
        cmd("migrate-set-parameters", mode="cpr-reboot"),
        cmd("query-migrate"),
        cmd("migrate", uri="foo:bar"),
        # the cpr channel is ignored outside cpr-transfer: the connection fails later
        cmd("migrate", channels=[ch(unix), ch(unix, "cpr")]),
        "WAIT_FAILED",
        cmd("query-migrate"),
        cmd("query-status"),
        caps("mapped-ram"),
        cmd("migrate", uri="tcp:127.0.0.1:1"),
        cmd("migrate-set-parameters", **{"multifd-compression": "zlib"}),
        cmd("migrate", uri=f"file:{cpr_file}-mapped"),
        caps("mapped-ram", state=False),
        cmd("migrate-set-parameters", **{"multifd-compression": "none"}),
        caps("multifd"),
        cmd("migrate", uri=f"file:{cpr_file}-multifd"),
        caps("multifd", state=False),
    ]
    for cap in CPR_CONFLICTS:
        s += [caps(cap), cmd("migrate", uri=f"file:{cpr_file}-{cap}"), ALL_CAPS_OFF]
    # postcopy-ram and x-colo are supported: both must refuse them with CPR, side by
    # side.
    s += [caps("postcopy-ram"), cmd("migrate", uri=f"file:{cpr_file}-postcopy"), ALL_CAPS_OFF]
    s += [caps("x-colo"), cmd("migrate", uri=f"file:{cpr_file}-colo"), ALL_CAPS_OFF]
    s += [
        # cpr-reboot saves the stopped VM
        cmd("migrate", uri=f"file:{cpr_file}-reboot"),
        "WAIT_COMPLETED",
        cmd("query-migrate"),
        cmd("query-status"),
        cmd("migrate", uri=f"file:{cpr_file}-again"),
        caps("postcopy-ram"),
        cmd("migrate", uri=f"file:{cpr_file}-again"),
        ALL_CAPS_OFF,
        cmd("cont"),
        cmd("query-status"),
        cmd("migrate-set-parameters", mode="normal"),
    ]
    return s


def snapshot_script():
    """Internal snapshots and jobs on a VM without block devices."""
    def snap(kind, job_id, devices=(), **extra):
        args = {"job-id": job_id, "tag": "t1"}
        if kind != "delete":
            args["vmstate"] = "x"
        args["devices"] = list(devices)
        args.update(extra)
        return cmd(f"snapshot-{kind}", **args)
    s = [
        cmd("query-jobs"),
        snap("save", "s1"),
        cmd("query-jobs"),
        snap("save", "s1"),
        snap("delete", "s1"),
        snap("load", "s1"),
    ]
    for verb in ("cancel", "pause", "resume", "complete", "finalize", "dismiss"):
        s += [cmd(f"job-{verb}", id="s1"), cmd(f"job-{verb}", id="nosuch")]
    s += [
        cmd("job-dismiss", id="s1"),
        cmd("job-dismiss"),
        cmd("job-dismiss", id=1),
        cmd("job-cancel", id="s1", force=True),
        cmd("query-jobs"),
        cmd("query-jobs", x=1),
        snap("save", "1bad"),
        snap("save", ""),
        snap("save", "a b"),
        snap("save", "#a"),
        snap("save", "a" * 200),
        snap("save", "a-b_c.d"),
        cmd("snapshot-save", **{"job-id": "m1"}),
        cmd("snapshot-save", **{"job-id": "m1", "tag": "t1", "devices": []}),
        cmd("snapshot-save", **{"job-id": "m1", "tag": "t1", "vmstate": "x"}),
        cmd("snapshot-save", **{"job-id": "m1", "tag": 1, "vmstate": "x", "devices": []}),
        cmd("snapshot-save", **{"job-id": "m1", "tag": "t", "vmstate": "x", "devices": [1]}),
        snap("save", "m1", extra=1),
        cmd("snapshot-delete", **{"job-id": "m1", "tag": "t1", "vmstate": "x",
                                  "devices": []}),
        snap("save", "s2", ["x", "y"]),
        snap("delete", "d1"),
        snap("delete", "d2", ["x"]),
        cmd("query-jobs"),
        cmd("query-status"),
        # a load stops a running VM first and leaves it stopped
        snap("load", "l1", ["x"]),
        cmd("query-status"),
        cmd("query-jobs"),
        cmd("cont"),
        cmd("query-status"),
        cmd("stop"),
        snap("load", "l2"),
        cmd("query-status"),
        cmd("cont"),
        snap("load", "l3"),
        cmd("query-status"),
        cmd("cont"),
        cmd("query-jobs"),
    ]
    for job_id in ("s2", "d1", "d2", "l1", "l2", "l3", "a" * 200, "a-b_c.d"):
        s.append(cmd("job-dismiss", id=job_id))
    s += [cmd("query-jobs"), cmd("query-status"), cmd("query-migrate")]
    return s


def incoming_script():
    """Commands on a VM started with -incoming defer."""
    return [
        cmd("query-status"),
        cmd("query-migrate"),
        cmd("migrate", uri="tcp:127.0.0.1:1"),
        cmd("migrate", uri="foo:bar"),
        cmd("migrate-incoming"),
        cmd("migrate-incoming", uri="foo:bar"),
        cmd("migrate-incoming", uri="tcp:127.0.0.1"),
        cmd("migrate-incoming", channels=[]),
        cmd("migrate-incoming", uri=1),
        cmd("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": "no"}),
        cmd("migrate-incoming", channels=[
            {"channel-type": "main", "addr": {"transport": "socket", "type": "inet",
                                              "host": "127.0.0.1", "port": "0"}},
            {"channel-type": "main", "addr": {"transport": "socket", "type": "inet",
                                              "host": "127.0.0.1", "port": "0"}}]),
        caps("multifd"), ALL_CAPS_OFF,
        caps("postcopy-ram"), ALL_CAPS_OFF,
        cmd("migrate-incoming", uri="tcp:127.0.0.1:0"),
        "WAIT_SETUP",
        cmd("query-migrate"),
        cmd("migrate-incoming", uri="tcp:127.0.0.1:0"),
        cmd("migrate-incoming", uri="foo:bar"),
        cmd("migrate", uri="tcp:127.0.0.1:1"),
        cmd("migrate-continue", state="setup"),
        cmd("migrate-pause"),
        cmd("migrate-recover", uri="tcp:127.0.0.1:0"),
        cmd("migrate-start-postcopy"),
        caps("multifd"),
        caps("postcopy-ram", "postcopy-preempt"),
        caps("events"),
        cmd("query-migrate-capabilities"),
        ALL_CAPS_OFF,
        cmd("migrate-set-parameters", **{"multifd-channels": 4}),
        cmd("query-migrationthreads"),
        cmd("query-migrate"),
        cmd("migrate_cancel"),
        cmd("query-migrate"),
        cmd("query-status"),
    ]


# ------------------------------------------------------------------------------------
# Running a script on both and comparing


# Statistics of a completed migration that depend on timing and stream framing.
RAM_MASKED = ("transferred", "mbps", "pages-per-second", "downtime-bytes")


def normalise(reply):
    """What must match between QEMU and vmigrate."""
    r = dict(reply)
    r.pop("id", None)
    ret = without_vmigrate_only_parameters(r.get("return"))
    if isinstance(ret, dict):
        ret = dict(ret)
        for k in ("setup-time", "total-time", "expected-downtime", "downtime"):
            if k in ret:
                ret[k] = "<ms>"
        if isinstance(ret.get("ram"), dict):
            ret["ram"] = {k: "<n>" if k in RAM_MASKED else v for k, v in ret["ram"].items()}
        for a in ret.get("socket-address", []):
            if "port" in a:
                a["port"] = "<port>"
        r["return"] = ret
    if isinstance(ret, list) and ret and isinstance(ret[0], dict) and "thread-id" in ret[0]:
        r["return"] = [dict(t, **{"thread-id": "<tid>"}) for t in ret]
    return r


def key_of(msg):
    return json.dumps(msg)


def run_script(q, v, script, subst=None):
    """Sends SCRIPT to QEMU (q) and vmigrate (v); returns the list of differences."""
    diffs = []
    subst = subst or {}
    unsupported = probe_unsupported(v)
    for msg in script:
        if msg == "WAIT_FAILED":
            for c in (q, v):
                wait_status(c, ("failed",))
            continue
        if msg == "WAIT_SETUP":
            for c in (q, v):
                wait_status(c, ("setup", "active"))
            continue
        if msg == "WAIT_IDLE":
            for c in (q, v):
                wait_status(c, (None, "completed", "failed", "cancelled"))
            continue
        if msg == "WAIT_COMPLETED":
            for c in (q, v):
                wait_status(c, ("completed",))
            continue
        key = key_of(msg)
        sent = json.loads(_subst(key, subst))
        if key in QEMU_ONLY:
            qr = q.send(sent)
            if qr != {"error": {"class": "GenericError", "desc": QEMU_ONLY[key]}}:
                diffs.append(f"{key}\n    qemu:     {qr}\n    expected: {QEMU_ONLY[key]!r}")
            continue
        if key in QEMU_SKIP:
            qr = None
        else:
            qr = q.send(sent)
        vr = v.send(sent)
        expected = vmigrate_expected(key, msg, qr or {}, unsupported)
        if expected is not None:
            got = vr.get("error", {})
            if got != {"class": "GenericError", "desc": expected}:
                diffs.append(f"{key}\n    vmigrate: {vr}\n    expected: {expected!r}")
            continue
        if normalise(qr) != normalise(vr):
            diffs.append(f"{key}\n    qemu:     {qr}\n    vmigrate: {vr}")
    return diffs


def _subst(text, subst):
    for k, val in subst.items():
        text = text.replace(k, val)
    return text


def wait_status(c, want, timeout=10):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = c.ok("query-migrate").get("status")
        if st in want:
            return st
        time.sleep(0.02)
    raise AssertionError(f"migration status not in {want} after {timeout}s")


def start_pair(ws, tag, **kw):
    q = ws.vm("qemu", f"q{tag}", mem_mib=16, ram_id="ram", shared=False, **kw)
    v = ws.vm("vmigrate", f"v{tag}", mem_mib=16, ram_id="ram", shared=False, **kw)
    q.start(connect=False)
    v.start(connect=False)
    return q, v, RawQMP.connect(q.qmp_path), RawQMP.connect(v.qmp_path)


def report(diffs):
    assert not diffs, f"{len(diffs)} replies differ:\n" + "\n".join(diffs)


# ------------------------------------------------------------------------------------
# QMP conformance


def test_qmp_parameters_and_capabilities(ws):
    require("qemu", "vmigrate")
    _, _, q, v = start_pair(ws, "opt")
    diffs = run_script(q, v, parameter_script() + capability_script())
    report(diffs)


def test_qmp_state_commands(ws):
    require("qemu", "vmigrate")
    _, _, q, v = start_pair(ws, "st")
    missing = ws.path("missing-dir")
    subst = {"@CPR_FILE@": ws.path("cpr.bin")}
    diffs = run_script(q, v, state_script("@CPR_FILE@", missing), subst)
    report(diffs)


def test_qmp_snapshots_and_jobs(ws):
    require("qemu", "vmigrate")
    _, _, q, v = start_pair(ws, "snap")
    report(run_script(q, v, snapshot_script()))


def _job_message_order(ws, impl):
    """Replies and events, in the order they arrive, for snapshot jobs."""
    m = ws.vm(impl, f"{impl}jobs", mem_mib=16, ram_id="ram", shared=False).start(
        connect=False)
    c = RawQMP.connect(m.qmp_path)
    order = []
    for kind, job_id in (("save", "s1"), ("delete", "d1"), ("load", "l1")):
        args = {"job-id": job_id, "tag": "t1", "devices": []}
        if kind != "delete":
            args["vmstate"] = "x"
        c.write({"execute": f"snapshot-{kind}", "arguments": args})
        seen = []
        while len(seen) < 5 + (kind == "load"):
            msg = c.read_line()
            if "event" in msg:
                data = msg.get("data") or {}
                seen.append(f"{msg['event']}:{data.get('status', '')}")
            else:
                seen.append(f"return:{msg}")
        order.append(seen)
    c.write({"execute": "job-dismiss", "arguments": {"id": "s1"}})
    order.append([str(c.read_line().get("return")), str(c.read_line().get("data"))])
    return order


def test_snapshot_job_events_match_qemu(ws):
    require("qemu", "vmigrate")
    q, v = _job_message_order(ws, "qemu"), _job_message_order(ws, "vmigrate")
    assert q[0] == ["JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running",
                    "return:{'return': {}}", "JOB_STATUS_CHANGE:aborting",
                    "JOB_STATUS_CHANGE:concluded"], q
    assert v == q, f"\n  qemu:     {q}\n  vmigrate: {v}"


def test_qmp_incoming_commands(ws):
    require("qemu", "vmigrate")
    _, _, q, v = start_pair(ws, "in", incoming="defer")
    report(run_script(q, v, incoming_script()))


def test_uri_parse_differences(ws):
    require("qemu", "vmigrate")
    _, _, q, v = start_pair(ws, "uri")
    diffs = []
    for uri, qemu_text in URI_PARSE_DIFFERENCES:
        qr, vr = q.cmd("migrate", uri=uri), v.cmd("migrate", uri=uri)
        assert qr["error"]["desc"] == qemu_text, qr
        if vr != qr:
            diffs.append(f"{uri}: qemu {qr} vmigrate {vr}")
        for c in (q, v):
            c.cmd("migrate_cancel")
            if c.ok("query-migrate").get("status") in ("setup", "active", "cancelling"):
                wait_status(c, ("cancelled", "failed"))
    report(diffs)


# ------------------------------------------------------------------------------------
# HMP conformance (through human-monitor-command)


def hmp_script():
    s = ["info migrate_capabilities", "info migrate_parameters", "info migrate",
         "info status"]
    values = {
        "max-bandwidth": ["100", "100k", "1.5M", "0", "-1", "abc", "1E", "9223372036854775808"],
        "avail-switchover-bandwidth": ["1G", "x"],
        "downtime-limit": ["1k", "0x10", "-5", "2000001", "abc"],
        "multifd-channels": ["4", "0", "256", "-1", "0x10", "x"],
        "xbzrle-cache-size": ["4096", "4095", "1M", "x"],
        "cpu-throttle-tailslow": ["on", "off", "yes", "no", "true", "false", "maybe"],
        "tls-creds": ["tls0", '""', "''"],
        "tls-hostname": ["host.example"],
        "tls-authz": ["authz0"],
        "mode": ["cpr-reboot", "nope", "normal"],
        "multifd-compression": ["zstd", "lz4", "none"],
        "zero-page-detection": ["legacy", "bogus"],
        "x-checkpoint-delay": ["4294967296", "100"],
        "announce-step": ["0", "10000"],
        "vcpu-dirty-limit": ["0", "1"],
        "block-bitmap-mapping": ["x"],
        "nosuch": ["1"],
        "direct-io": ["on", "off"],
        "max-cpu-throttle": ["10", "99"],
        "x-vcpu-dirty-limit-period": ["0", "1000"],
    }
    for p, vals in values.items():
        for v in vals:
            s.append(f"migrate_set_parameter {p} {v}")
        s.append("info migrate_parameters")
    s += ["migrate_set_parameter", "migrate_set_parameter max-bandwidth",
          "migrate_set_capability events on", "migrate_set_capability events off",
          "migrate_set_capability events true", "migrate_set_capability nosuch on",
          "migrate_set_capability xbzrle on", "migrate_set_capability xbzrle off",
          "migrate_set_capability", "info migrate_capabilities",
          "migrate_continue bogus", "migrate_continue pre-switchover",
          "migrate_pause", "migrate_recover tcp:127.0.0.1:1", "migrate_start_postcopy",
          "migrate_incoming tcp:127.0.0.1:0", "migrate_cancel", "migrate foo:bar",
          "migrate -d tcp:", "migrate -r tcp:127.0.0.1:1", "info migrate",
          "help migrate", "help migrate_set_parameter", "nosuchcommand"]
    # modes: QEMU's cpr-transfer blocker for RAM that is not shared
    s += ["migrate_set_parameter mode cpr-transfer", "info migrate",
          "migrate tcp:127.0.0.1:1", "migrate file:/nonexistent/x",
          "migrate_set_parameter mode cpr-reboot", "info migrate", "migrate foo:bar",
          "migrate_set_parameter mode normal", "info migrate"]
    # vCPU dirty limits (no KVM dirty ring)
    s += ["set_vcpu_dirty_limit", "set_vcpu_dirty_limit 100", "set_vcpu_dirty_limit -1",
          "set_vcpu_dirty_limit 0", "set_vcpu_dirty_limit 100 0",
          "set_vcpu_dirty_limit 100 5", "set_vcpu_dirty_limit x",
          "set_vcpu_dirty_limit 100 -1", "set_vcpu_dirty_limit 100 x",
          "set_vcpu_dirty_limit 1 2 3", "set_vcpu_dirty_limit 100 -2",
          "cancel_vcpu_dirty_limit", "cancel_vcpu_dirty_limit 0",
          "cancel_vcpu_dirty_limit 5", "cancel_vcpu_dirty_limit -1",
          "cancel_vcpu_dirty_limit x", "cancel_vcpu_dirty_limit 1 2",
          "info vcpu_dirty_limit", "info vcpu_dirty_limit x",
          "help set_vcpu_dirty_limit", "help cancel_vcpu_dirty_limit",
          "help info vcpu_dirty_limit"]
    # internal snapshots: no block device can hold them; loadvm stops the VM first
    s += ["info snapshots", "info snapshots x", "savevm", "savevm t1", 'savevm "a b"',
          "savevm a b", "loadvm", "delvm", "delvm t1", "info status", "loadvm t1",
          "info status", "cont", "stop", "loadvm t1", "info status", "cont",
          "info status", "help savevm", "help loadvm", "help delvm",
          "help info snapshots"]
    # calc_dirty_rate (the measuring one last: the others would find it running)
    s += ["calc_dirty_rate", "calc_dirty_rate 0", "calc_dirty_rate -r -b 1",
          "calc_dirty_rate -r 1", "calc_dirty_rate x", "calc_dirty_rate -1",
          "calc_dirty_rate -x 1", "calc_dirty_rate 1 2 3", "calc_dirty_rate 1/0",
          "calc_dirty_rate 1*", "calc_dirty_rate (1", "calc_dirty_rate 'ab'",
          "calc_dirty_rate 99999999999999999999", "calc_dirty_rate $pc",
          "calc_dirty_rate 61", "calc_dirty_rate 1 -5", "calc_dirty_rate 1 100",
          "calc_dirty_rate 1 20000", "calc_dirty_rate -r 1 256",
          "calc_dirty_rate -b 1 256", "calc_dirty_rate 1 -1",
          "calc_dirty_rate 'a'", "calc_dirty_rate ~0", "calc_dirty_rate 1 x",
          "help calc_dirty_rate", "calc_dirty_rate 1",
          # (a second `calc_dirty_rate 1` at once races in QEMU: its measuring thread
          # may not have claimed the state yet, and then it also prints "Starting"; the
          # same race lets QEMU check the range first, so wait for "measuring")
          "WAIT_MEASURING", "calc_dirty_rate 61", "WAIT_DIRTY_RATE",
          "calc_dirty_rate -b 1"]
    return s


def test_hmp_conformance(ws):
    require("qemu", "vmigrate")
    _, _, q, v = start_pair(ws, "hmp")
    unsupported = probe_unsupported(v)
    diffs = []
    for line in hmp_script():
        if line == "WAIT_MEASURING":
            for c in (q, v):
                t0 = time.time()
                while c.ok("query-dirty-rate")["status"] != "measuring" \
                        and time.time() - t0 < 0.5:
                    time.sleep(0.005)
            continue
        if line == "WAIT_DIRTY_RATE":
            for c in (q, v):
                t0 = time.time()
                while c.ok("query-dirty-rate")["status"] == "measuring":
                    assert time.time() - t0 < 10, "dirty-rate measurement does not end"
                    time.sleep(0.05)
            continue
        qr, vr = q.hmp(line), v.hmp(line)
        expected = vmigrate_hmp_expected(line, unsupported)
        if expected is not None:
            if vr != expected:
                diffs.append(f"{line!r}\n    vmigrate: {vr!r}\n    expected: {expected!r}")
        elif qr != vr:
            diffs.append(f"{line!r}\n    qemu:     {qr!r}\n    vmigrate: {vr!r}")
    report(diffs)


# ------------------------------------------------------------------------------------
# Protocol level: negotiation, framing errors, OOB


def protocol_script():
    """Raw messages sent before and after negotiation (marker "NEGOTIATE")."""
    return [
        b'{"execute": "query-status", "id": 1}',
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}',
        b'{"execute": "qmp_capabilities", "arguments": {"bogus": 1}}',
        b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}',
        b'{"exec-oob": "qmp_capabilities"}',
        "NEGOTIATE",
        b'{"execute": "qmp_capabilities", "id": "again"}',
        b'{"execute": }',
        b'[1,2]',
        b'{"id":5}',
        b'{"execute": "query-status", "arguments": []}',
        b'{"execute": 42}',
        b'{"execute": "query-status", "extra": 1}',
        b'{"execute": "query-status", "exec-oob": "migrate-pause"}',
        b'{"exec-oob": "migrate-pause", "id": "o1"}',
        b'{"exec-oob": "query-status", "id": "o2"}',
        b'{"exec-oob": "nosuch", "id": "o3"}',
        b'{"exec-oob": "migrate-recover", "arguments": {"uri": "tcp:127.0.0.1:0"}, "id": 4}',
        b'{"exec-oob": 1}',
        b'{"execute": "no-such-command", "id": [1, {"a": null}]}',
        b"{'execute': 'query-status', 'id': 'sq'}",
        b'{"execute": "query-status", "id": null}',
        b'{"execute": "query-status", "id": 1.5}',
        b'{"execute": "query-status", "arguments": {"x": 1}}',
        b'{"execute": "query-migrate-capabilities", "arguments": null}',
    ]


def run_protocol(path, enable):
    c = RawQMP.connect(path, negotiate=False)
    replies = []
    for m in protocol_script():
        if m == "NEGOTIATE":
            args = {"enable": enable} if enable else {}
            replies.append(c.send({"execute": "qmp_capabilities", "arguments": args}))
        else:
            replies.append(c.send(m))
    # a stray control character resets the parser; the next command works
    c.write(b'{"execute": "query-status"\x01')
    replies.append(c.reply())
    replies.append(c.send(b'{"execute": "query-status", "id": "after"}'))
    # two objects back to back, then one split over two writes
    c.write(b'{"execute": "query-status", "id": 6}{"execute": "query-status", "id": 7}')
    replies += [c.reply(), c.reply()]
    c.write(b'{"execute": "query-')
    time.sleep(0.05)
    replies.append(c.send(b'status", "id": 8}\n'))
    c.close()
    return replies


@pytest.mark.parametrize("enable", [None, ["oob"]], ids=["no-oob", "oob"])
def test_protocol_conformance(ws, enable):
    require("qemu", "vmigrate")
    qm, vm, q, v = start_pair(ws, "proto")
    q.close()
    v.close()
    qr, vr = run_protocol(qm.qmp_path, enable), run_protocol(vm.qmp_path, enable)
    assert len(qr) == len(vr)
    diffs = [f"{m!r}\n    qemu:     {a}\n    vmigrate: {b}"
             for m, a, b in zip([*protocol_script(), "stray", "after", "6", "7", "split"],
                                qr, vr) if a != b]
    report(diffs)


# ------------------------------------------------------------------------------------
# Discovery: query-qmp-schema and query-commands describe what vmigrate offers


def test_schema_describes_commands(ws):
    require("vmigrate")
    m = ws.vm("vmigrate", "schema", mem_mib=16, ram_id="ram", shared=False).start(
        connect=False)
    v = RawQMP.connect(m.qmp_path)
    schema = v.ok("query-qmp-schema")
    by_name = {e["name"]: e for e in schema}
    commands = {e["name"] for e in schema if e["meta-type"] == "command"}
    listed = {c["name"] for c in v.ok("query-commands")}
    assert commands == listed
    for name in ["migrate", "migrate-incoming", "migrate_cancel", "migrate-continue",
                 "migrate-pause", "migrate-recover", "migrate-start-postcopy",
                 "migrate-set-capabilities", "query-migrate-capabilities",
                 "migrate-set-parameters", "query-migrate-parameters", "query-migrate",
                 "query-migrationthreads", "query-qmp-schema", "query-commands",
                 "set-vcpu-dirty-limit", "cancel-vcpu-dirty-limit",
                 "query-vcpu-dirty-limit", "snapshot-save", "snapshot-load",
                 "snapshot-delete", "query-jobs", "job-dismiss", "job-cancel"]:
        assert name in commands, name
    # every command is answered as known (a missing argument at worst)
    for name in commands - {"quit", "qmp_capabilities"}:
        r = v.cmd(name)
        assert r.get("error", {}).get("class") != "CommandNotFound", (name, r)
    # OOB as in QEMU: exactly migrate-pause and migrate-recover here
    assert {e["name"] for e in schema if e.get("allow-oob")} == {"migrate-pause",
                                                                  "migrate-recover"}
    # every type a command or event refers to is described
    for e in schema:
        for ref in (e.get("arg-type"), e.get("ret-type"), e.get("element-type")):
            if ref is not None:
                assert ref in by_name, (e, ref)
        for member in e.get("members", []):
            if "type" in member:
                assert member["type"] in by_name, (e, member)
    mig = by_name[by_name["migrate"]["arg-type"]]
    members = {x["name"]: x for x in mig["members"]}
    assert set(members) == {"uri", "channels", "detach", "resume"}
    assert by_name[members["uri"]["type"]]["json-type"] == "string"
    assert "default" in members["uri"]
    chan = by_name[by_name[members["channels"]["type"]]["element-type"]]
    assert [x["name"] for x in chan["members"]] == ["channel-type", "addr"]
    cont = by_name[by_name["migrate-continue"]["arg-type"]]
    status = by_name[cont["members"][0]["type"]]
    assert status["meta-type"] == "enum" and "pre-switchover" in status["values"]
    caps_ret = by_name[by_name["query-migrate-capabilities"]["ret-type"]]
    assert caps_ret["meta-type"] == "array"
    cap_enum = by_name[by_name[caps_ret["element-type"]]["members"][0]["type"]]
    assert cap_enum["values"] == CAPABILITIES
    params = by_name[by_name["migrate-set-parameters"]["arg-type"]]
    assert {x["name"] for x in params["members"]} == set(DEFAULT_PARAMS) | {
        "block-bitmap-mapping"} | set(VMIGRATE_ONLY_PARAMETERS)
    assert {k: x for k, x in v.ok("query-migrate-parameters").items()
            if k not in DEFAULT_PARAMS} == VMIGRATE_ONLY_PARAMETERS
    events = {e["name"] for e in schema if e["meta-type"] == "event"}
    assert {"MIGRATION", "MIGRATION_PASS", "STOP", "RESUME", "JOB_STATUS_CHANGE"} <= events
    ev = by_name[by_name["MIGRATION"]["arg-type"]]
    assert ev["members"][0]["name"] == "status"


# ------------------------------------------------------------------------------------
# QEMU's own asyncio client drives vmigrate


def test_qemu_qmp_client_drives_vmigrate(ws):
    require("vmigrate")
    qmp_mod = pytest.importorskip("qemu.qmp")
    m = ws.vm("vmigrate", "aio", mem_mib=16, ram_id="ram", shared=False).start(
        connect=False)
    dst = ws.vm("vmigrate", "aiodst", mem_mib=16, ram_id="ram", shared=False,
                incoming="defer").start(connect=False)
    for p in (m.qmp_path, dst.qmp_path):
        RawQMP.connect(p).close()

    async def drive():
        src = qmp_mod.QMPClient("src")
        d = qmp_mod.QMPClient("dst")
        await src.connect(m.qmp_path)
        await d.connect(dst.qmp_path)
        try:
            status = await src.execute("query-status")
            assert status == {"running": True, "status": "running"}
            caps = await src.execute("query-migrate-capabilities")
            assert [c["capability"] for c in caps] == CAPABILITIES
            with pytest.raises(qmp_mod.ExecuteError) as e:
                await src.execute("no-such-command")
            assert e.value.error_class == "CommandNotFound"
            with pytest.raises(qmp_mod.ExecuteError) as e:
                await src.execute("migrate-set-parameters", {"downtime-limit": 2000001})
            assert "(2000 * 1000)" in str(e.value)
            # out of band, as QEMU's client sends it
            with pytest.raises(qmp_mod.ExecuteError) as e:
                await src.execute("migrate-pause", oob=True)
            assert "postcopy-active" in str(e.value)
            for c in (src, d):
                await c.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]})
            await d.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = (await d.execute("query-migrate"))["socket-address"][0]["port"]
            seen = []
            listener = qmp_mod.EventListener()
            with src.listen(listener):
                await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
                async for event in listener:
                    seen.append(event["event"])
                    if event["event"] == "MIGRATION" and \
                            event["data"]["status"] in ("completed", "failed"):
                        assert event["data"]["status"] == "completed"
                        break
            assert "MIGRATION_PASS" in seen
            assert (await src.execute("query-status"))["status"] == "postmigrate"
        finally:
            await src.disconnect()
            await d.disconnect()

    asyncio.run(asyncio.wait_for(drive(), 60))


# ------------------------------------------------------------------------------------
# Hostile clients: the monitor answers clearly and keeps serving the others


def test_hostile_qmp_clients(ws):
    require("vmigrate")
    m = ws.vm("vmigrate", "hostile", mem_mib=16, ram_id="ram", shared=False).start(
        connect=False)
    watcher = RawQMP.connect(m.qmp_path)

    # a huge message (20 MiB): refused with a clear error, the connection goes on
    big = RawQMP.connect(m.qmp_path)
    payload = b'{"execute": "query-status", "arguments": {"x": "' + b"A" * (20 << 20) \
        + b'"}, "id": "big"}'
    sender = threading.Thread(target=big.write, args=(payload,))
    sender.start()
    r = big.reply()
    sender.join()
    assert "error" in r and "longer than" in r["error"]["desc"], r
    assert big.send({"execute": "query-status", "id": 2}) == {
        "return": {"running": True, "status": "running"}, "id": 2}
    big.close()

    # deeply nested and invalid input
    bad = RawQMP.connect(m.qmp_path)
    r = bad.send(b"[" * 5000 + b"]" * 5000)
    assert "error" in r, r
    r = bad.send(b'{"execute": "query-status", "arguments": {"a": "\xff\xfe"}}')
    assert "error" in r, r
    r = bad.send({"execute": "migrate-set-parameters",
                  "arguments": {"max-bandwidth": {"deep": [1, 2, {"x": None}]}}})
    assert r["error"]["desc"] == "Parameter 'max-bandwidth' expects uint64"
    assert "return" in bad.send({"execute": "query-migrate"})
    bad.close()

    # commands before negotiation, then a client that leaves mid-command
    early = RawQMP.connect(m.qmp_path, negotiate=False)
    r = early.send({"execute": "query-migrate", "id": 1})
    assert r == {"id": 1, "error": {"class": "CommandNotFound",
                 "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    early.write(b'{"execute": "qmp_capabilities"}{"execute": "migrate-set-par')
    early.close()
    gone = RawQMP.connect(m.qmp_path)
    gone.write({"execute": "migrate-set-parameters",
                "arguments": {"downtime-limit": 1234}})
    gone.sock.shutdown(socket.SHUT_RDWR)
    gone.close()
    hmp_gone = RawQMP.connect(m.qmp_path)
    hmp_gone.write({"execute": "human-monitor-command",
                    "arguments": {"command-line": "info migrate_parameters"}})
    hmp_gone.close()

    # twenty clients at once, each with its own commands and ids
    errors = []

    def client(i):
        try:
            c = RawQMP.connect(m.qmp_path)
            for j in range(25):
                r = c.send({"execute": "query-migrate-parameters", "id": [i, j]})
                assert r["id"] == [i, j] and "return" in r, r
                r = c.send({"execute": "nosuch", "id": j})
                assert r["error"]["class"] == "CommandNotFound", r
            c.close()
        except Exception as e:  # reported below
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    # the first client is still served and sees the departed client's change
    params = watcher.ok("query-migrate-parameters")
    assert params["downtime-limit"] == 1234
    assert m.alive()
    watcher.close()


# ------------------------------------------------------------------------------------
# query-migrationthreads during a migration, and the precopy event sequence


def test_migration_threads(ws):
    require("qemu", "vmigrate")
    replies = {}
    for impl in ("qemu", "vmigrate"):
        src = ws.vm(impl, f"{impl}src", mem_mib=64).start(connect=False)
        src.write_ram(os.urandom(64 << 20))
        dst = ws.vm(impl, f"{impl}dst", mem_mib=64, incoming="defer").start(
            connect=False)
        s, d = RawQMP.connect(src.qmp_path), RawQMP.connect(dst.qmp_path)
        assert s.ok("query-migrationthreads") == []
        d.ok("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = d.ok("query-migrate")["socket-address"][0]["port"]
        s.ok("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
        s.ok("migrate", uri=f"tcp:127.0.0.1:{port}")
        wait_status(s, ("active",))
        threads = s.ok("query-migrationthreads")
        replies[impl] = threads
        assert d.ok("query-migrationthreads") == []
        assert [t["name"] for t in threads] == ["mig/src/main"], threads
        tid = threads[0]["thread-id"]
        assert os.path.exists(f"/proc/{src.proc.pid}/task/{tid}"), threads
        s.ok("migrate_cancel")
        wait_status(s, ("cancelled",))
        assert s.ok("query-migrationthreads") == []
        s.close()
        d.close()
    assert replies["qemu"][0].keys() == replies["vmigrate"][0].keys()


def _event_sequence(ws, impl, running):
    tag = f"{impl}{'run' if running else 'stop'}"
    src = ws.vm(impl, f"{tag}s", mem_mib=32, ram_id="ram", shared=False).start(
        connect=False)
    dst = ws.vm(impl, f"{tag}d", mem_mib=32, ram_id="ram", shared=False,
                incoming="defer").start(connect=False)
    s, d = RawQMP.connect(src.qmp_path), RawQMP.connect(dst.qmp_path)
    if not running:
        s.ok("stop")
    for c in (s, d):
        c.ok("migrate-set-capabilities",
             capabilities=[{"capability": "events", "state": True}])
        c.events.clear()
    s.ok("migrate-set-parameters", **{"max-bandwidth": 0})
    d.ok("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = d.ok("query-migrate")["socket-address"][0]["port"]
    s.ok("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_status(s, ("completed",))
    wait_status(d, ("completed",))

    def names(c):
        out = []
        for e in c.drain_events(0.3):
            if e["event"] == "MIGRATION":
                out.append("MIGRATION:" + e["data"]["status"])
            elif e["event"] == "MIGRATION_PASS":
                out.append(f"PASS:{e['data']['pass']}")
            elif e["event"] in ("STOP", "RESUME"):
                out.append(e["event"])
        return out

    return names(s), names(d)


# QEMU switches over as soon as its pending-RAM estimate is 0 while no bandwidth has been
# measured yet, without another dirty sync; vmigrate decides the same way.
@pytest.mark.parametrize("running", [True, False], ids=["running", "paused"])
def test_event_sequence_matches_qemu(ws, running):
    require("qemu", "vmigrate")
    q = _event_sequence(ws, "qemu", running)
    v = _event_sequence(ws, "vmigrate", running)
    assert q[0][0] == "MIGRATION:setup" and q[0][-1] == "MIGRATION:completed", q
    assert v == q, f"\n  qemu:     {q}\n  vmigrate: {v}"
