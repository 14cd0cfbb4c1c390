#!/usr/bin/env python3
"""Turns Debian's `fortunes` package into a byte-level corpus: train.txt and heldout.txt.

    python3 scripts/make_corpus.py --out build/corpus

The package's fortune files (/usr/share/games/fortunes: quotations, jokes, definitions; ~2.5 MB
of English) hold documents separated by lines of a single '%'. Each document goes to held-out
when the CRC-32 of its text is 0 mod --heldout-every (20: about 5%), else to train — a split by
document, stable across machines and package file order, so no held-out text is ever trained on.
Documents are written in file order (files sorted by name), each followed by a line '%'. Both
files are written to temporary names and renamed at the end: on any error nothing is written and
nothing already there is touched.
"""

import argparse
import os
import sys
import zlib

DEFAULT_SOURCE = "/usr/share/games/fortunes"
PACKAGE_HINT = "install the Debian package 'fortunes' (bash scripts/setup.sh installs it)"


def fail(message):
    print(f"make_corpus: {message}", file=sys.stderr)
    sys.exit(2)


def fortune_files(source):
    """The fortune text files of `source` (a directory or one file): no .dat index, no .u8 link."""
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        fail(f"--source {source} does not exist: {PACKAGE_HINT}")
    names = sorted(n for n in os.listdir(source)
                   if not n.endswith((".dat", ".u8")) and not n.startswith("."))
    files = [os.path.join(source, n) for n in names
             if os.path.isfile(os.path.join(source, n)) and not os.path.islink(os.path.join(source, n))]
    if not files:
        fail(f"--source {source} holds no fortune files: {PACKAGE_HINT}")
    return files


def documents(path):
    with open(path, "rb") as f:
        text = f.read()
    docs, current = [], []
    for line in text.split(b"\n"):
        if line.strip() == b"%":
            if current:
                docs.append(b"\n".join(current).strip(b"\n"))
            current = []
        else:
            current.append(line)
    if current:
        docs.append(b"\n".join(current).strip(b"\n"))
    return [d for d in docs if d.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=DEFAULT_SOURCE,
                    help="the fortunes directory (or one fortune file)")
    ap.add_argument("--out", required=True, help="directory for train.txt and heldout.txt")
    ap.add_argument("--heldout-every", type=int, default=20,
                    help="a document is held out when crc32(text) %% N == 0")
    args = ap.parse_args(argv)
    if args.heldout_every < 2:
        fail(f"--heldout-every={args.heldout_every} must be >= 2")

    train, heldout = [], []
    for path in fortune_files(args.source):
        for doc in documents(path):
            (heldout if zlib.crc32(doc) % args.heldout_every == 0 else train).append(doc)
    if not train or not heldout:
        fail(f"--source {args.source} gave {len(train)} training and {len(heldout)} held-out "
             f"documents; both must be non-empty ({PACKAGE_HINT})")

    os.makedirs(args.out, exist_ok=True)
    written = []
    try:
        for name, docs in (("train.txt", train), ("heldout.txt", heldout)):
            tmp = os.path.join(args.out, f".{name}.tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(d + b"\n%\n" for d in docs))
            written.append((tmp, os.path.join(args.out, name)))
        for tmp, final in written:
            os.replace(tmp, final)
    finally:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
    sizes = {name: os.path.getsize(os.path.join(args.out, name)) for name in ("train.txt", "heldout.txt")}
    print(f"make_corpus: {len(train)} documents, {sizes['train.txt']:,} bytes -> {args.out}/train.txt; "
          f"{len(heldout)} documents, {sizes['heldout.txt']:,} bytes -> {args.out}/heldout.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
