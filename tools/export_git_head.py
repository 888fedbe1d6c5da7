"""Write the files of a bare git repository's HEAD into a folder, skipping blobs the repository lacks.

    python tools/export_git_head.py REPO.git DEST

A snapshot brought by the search tool's ``fetch`` may hold a tree whose largest blobs are absent (tokenizer files
of models the tests do not use); ``git archive`` stops at the first of them, this writes every other file.
"""

from __future__ import annotations

import os
import subprocess
import sys


def export(repo: str, dest: str) -> list[str]:
    """Export HEAD of ``repo`` into ``dest``; returns the paths whose blobs were absent."""
    git = ["git", "--git-dir", repo]
    listing = subprocess.run(git + ["ls-tree", "-r", "-z", "HEAD"], capture_output=True, check=True).stdout
    entries = []
    for line in filter(None, listing.split(b"\0")):
        meta, path = line.split(b"\t", 1)
        mode, kind, sha = meta.split()
        if kind == b"blob":
            entries.append((mode, sha, path.decode()))
    blobs = subprocess.run(git + ["cat-file", "--batch"], input=b"".join(sha + b"\n" for _, sha, _ in entries),
                           capture_output=True, check=True).stdout
    at, missing = 0, []
    for mode, _, path in entries:
        end = blobs.index(b"\n", at)
        header = blobs[at:end].split()
        at = end + 1
        if header[-1] == b"missing":
            missing.append(path)
            continue
        size = int(header[2])
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(blobs[at:at + size])
        if mode == b"100755":
            os.chmod(target, 0o755)
        at += size + 1
    return missing


if __name__ == "__main__":
    absent = export(sys.argv[1], sys.argv[2])
    print(f"exported HEAD of {sys.argv[1]}; absent from it: {absent or 'nothing'}", file=sys.stderr)
