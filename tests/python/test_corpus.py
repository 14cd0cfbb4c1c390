"""scripts/make_corpus.py and train_gpt.py's corpus loader: clear errors, nothing written on failure."""

import os
import subprocess
import sys
import zlib

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "make_corpus.py")
GPT = os.path.join(ROOT, "examples", "python", "train_gpt.py")


def make(*argv):
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True)


def fortune_file(path, docs):
    with open(path, "w") as f:
        f.write("".join(d + "\n%\n" for d in docs))


def test_missing_package_is_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    p = make("--source", str(tmp_path / "no-such-dir"), "--out", str(out))
    assert p.returncode == 2
    assert "no-such-dir does not exist" in p.stderr and "'fortunes'" in p.stderr
    assert not out.exists()


def test_empty_directory_and_empty_file_are_refused(tmp_path):
    (tmp_path / "empty-dir").mkdir()
    p = make("--source", str(tmp_path / "empty-dir"), "--out", str(tmp_path / "o1"))
    assert p.returncode == 2 and "holds no fortune files" in p.stderr
    (tmp_path / "empty.txt").write_text("")
    p = make("--source", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o2"))
    assert p.returncode == 2 and "gave 0 training and 0 held-out documents" in p.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_failed_run_leaves_an_earlier_corpus_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.txt").write_text("earlier")
    (tmp_path / "empty.txt").write_text("%\n%\n")
    p = make("--source", str(tmp_path / "empty.txt"), "--out", str(out))
    assert p.returncode == 2
    assert (out / "train.txt").read_text() == "earlier"
    assert sorted(os.listdir(out)) == ["train.txt"]


def test_split_by_document(tmp_path):
    docs = [f"document {i}\n\tline two of {i}" for i in range(400)]
    fortune_file(tmp_path / "f", docs)
    p = make("--source", str(tmp_path / "f"), "--out", str(tmp_path / "c"), "--heldout-every", "10")
    assert p.returncode == 0, p.stderr
    train = (tmp_path / "c" / "train.txt").read_bytes().split(b"\n%\n")[:-1]
    held = (tmp_path / "c" / "heldout.txt").read_bytes().split(b"\n%\n")[:-1]
    assert sorted(train + held) == sorted(d.encode() for d in docs)
    assert not set(train) & set(held)
    assert all(zlib.crc32(d) % 10 == 0 for d in held) and len(held) > 10


def test_train_gpt_refuses_a_missing_or_empty_corpus(tmp_path):
    env = dict(os.environ)
    p = subprocess.run([sys.executable, GPT, "--corpus", str(tmp_path / "none")], capture_output=True,
                       text=True, env=env)
    assert p.returncode != 0
    assert f"{tmp_path / 'none' / 'train.txt'} does not exist" in p.stderr and "'fortunes'" in p.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.txt").write_text("x")
    (tmp_path / "c" / "heldout.txt").write_text("")
    p = subprocess.run([sys.executable, GPT, "--corpus", str(tmp_path / "c")], capture_output=True,
                       text=True, env=env)
    assert p.returncode != 0 and "heldout.txt is empty" in p.stderr
