#!/usr/bin/env python3
"""Waits until process PID itself listens on 127.0.0.1:PORT.

Usage: listening.py PID PORT [SECONDS]
Exits 0 once it does; 1 if the process ended or the time (default 30 s) ran
out. A port from free-port.py can be taken by someone else before the server
binds it: a plain "can I connect?" check would then talk to the wrong server.
"""
import os
import sys
import time

pid, port = int(sys.argv[1]), int(sys.argv[2])
deadline = time.time() + float(sys.argv[3] if len(sys.argv) > 3 else 30)
want = "0100007F:%04X" % port


def listening_inodes():
    inodes = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid):
    out = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


while time.time() < deadline:
    try:
        if listening_inodes() & socket_inodes(pid):
            sys.exit(0)
    except FileNotFoundError:
        sys.exit(1)  # the process ended
    time.sleep(0.1)
sys.exit(1)
