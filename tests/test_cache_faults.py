"""The cache when the world misbehaves, through real processes and real files: fila touches only its
own files; a cache that cannot be written costs one warning, never an answer; two processes
sharing the cache never crash each other; `fila cache info --json`, `clear` and `--cache-max-gb`."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.bad_documents import make_good_pdf
from tests.helpers.run_fila import fila as run_fila

QUESTION = "What is the total due?"
WARNING = "cannot write the cache"


@pytest.fixture(scope="module")
def pdf(tmp_path_factory):
    return make_good_pdf(tmp_path_factory.mktemp("docs") / "invoice.pdf", ["Total due: 42.00 EUR. Signed by Ada."])


def fila(*args, cache: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``fila ARGS...`` in a new process; cache: the FILA_CACHE_DIR it uses (the test's own by default)."""
    return run_fila(*args, env=None if cache is None else {"FILA_CACHE_DIR": str(cache)}, **kwargs)


def ask(bundle, pdf, *args, **kwargs) -> subprocess.CompletedProcess:
    return fila("ask", pdf, QUESTION, "--model", bundle, "--max-tokens", 6, "--json", *args, **kwargs)


def cache_info(cache: Path) -> dict:
    completed = fila("cache", "info", "--json", cache=cache)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)  # stdout is exactly one JSON object


def entries(info: dict) -> dict[str, int]:
    return {store["name"]: store["entries"] for store in info["stores"]}


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


# -- fila touches only its own files --

def user_files(cache: Path) -> dict[Path, bytes]:
    """Files a user keeps in the folder they pointed FILA_CACHE_DIR at, some with fila's suffixes."""
    files = {cache / "model.safetensors": b"user weights", cache / "llm-prefix" / "notes.llstate": b"mine",
             cache / "tokens" / "ab" / "vocab.safetensors": b"mine too", cache / "sub" / "adapter.safetensors": b"lora",
             cache / "tokens" / "draft.partial": b"a user's download"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.mark.slow  # 84 s at load ~16 on 2 cores: several fila runs
def test_eviction_and_clear_keep_a_users_files_and_cache_max_gb_caps_from_the_cli(bundle, pdf, tmp_path):
    cache = tmp_path / "models"
    mine = user_files(cache)
    other = make_good_pdf(tmp_path / "other.pdf", ["Another page, another total: 7.00 EUR."])
    # A cap below one page of tokens: every write evicts all but the entry just written.
    for document in (pdf, other):
        completed = ask(bundle, document, "--cache-max-gb", "0.000001", cache=cache)
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout)["answer"] is not None
    info = cache_info(cache)
    assert entries(info) == {"tokens": 1, "llm-prefix": 0}, "--cache-max-gb from the command line was not applied"
    assert all(path.read_bytes() == data for path, data in mine.items()), "eviction removed a file fila never wrote"
    # The default cap keeps both pages and the prefix states.
    for document in (pdf, other):
        assert ask(bundle, document, cache=cache).returncode == 0
    assert entries(cache_info(cache)) == {"tokens": 2, "llm-prefix": 2}
    cleared = fila("cache", "clear", cache=cache)
    assert cleared.returncode == 0, cleared.stderr
    assert entries(cache_info(cache)) == {"tokens": 0, "llm-prefix": 0}
    assert all(path.read_bytes() == data for path, data in mine.items()), "fila cache clear removed a user's file"


def test_cache_clear_removes_fila_leftovers_and_an_older_layout_only(bundle, pdf, tmp_path):
    cache = tmp_path / "cache"
    assert ask(bundle, pdf, cache=cache).returncode == 0
    (token_entry,) = (cache / "tokens").glob("*/*.safetensors")
    key = token_entry.stem
    # A kill's leftovers: this fila's temporary names and the names fila used before (pid-suffixed).
    leftovers = [token_entry.parent / f".{token_entry.name}.x1y2z3.partial",
                 token_entry.parent / f"{token_entry.name}.4242.partial",
                 cache / "llm-prefix" / f".{key}.llstate.4242.partial",
                 cache / "llm-prefix" / ".tmpAb12Cd",  # safetensors' own temporary file, its write killed
                 # The layout before this one: tokens in <root>/ab/, prefix states inside the old token root.
                 cache / key[:2] / f"{key}.safetensors", cache / "tokens" / "llm-prefix" / f"{key}.llstate"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    mine = user_files(cache)
    cleared = fila("cache", "clear", cache=cache)
    assert cleared.returncode == 0, cleared.stderr
    assert "older cache layout" in cleared.stdout, cleared.stdout
    assert not [path for path in leftovers if path.exists()], "leftover .partial files survived fila cache clear"
    assert all(path.read_bytes() == data for path, data in mine.items())
    assert files_under(cache) == {str(p.relative_to(cache)) for p in mine} | {"tokens/CACHEDIR.TAG", "llm-prefix/CACHEDIR.TAG"}


def test_cache_info_json_and_sizes(bundle, pdf, tmp_path):
    cache = tmp_path / "cache"
    assert ask(bundle, pdf, cache=cache).returncode == 0
    info = cache_info(cache)
    assert info["path"] == str(cache) and entries(info) == {"tokens": 1, "llm-prefix": 1}
    on_disk = sum(p.stat().st_size for p in cache.rglob("*") if p.suffix in (".safetensors", ".llstate"))
    assert info["bytes"] == on_disk == sum(store["bytes"] for store in info["stores"])
    text = fila("cache", "info", cache=cache)
    assert text.returncode == 0 and "(0.00 GB)" not in text.stdout
    assert "1 pages of visual tokens" in text.stdout and "1 LLM prefix states" in text.stdout, text.stdout


# -- a cache that cannot be written costs a warning, never the answer --

def assert_answered_with_one_warning(completed: subprocess.CompletedProcess) -> None:
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["answer"] is not None
    assert completed.stderr.count(WARNING) == 1, completed.stderr
    assert "unexpected" not in completed.stderr and "Traceback" not in completed.stderr, completed.stderr


def no_partial_files(folder: Path) -> bool:
    return not [name for name in files_under(folder) if "partial" in name or "/.tmp" in f"/{name}"]


def test_an_uncreatable_cache_folder_costs_a_warning_not_the_answer(bundle, pdf, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_answered_with_one_warning(ask(bundle, pdf, cache=blocker / "cache"))


def mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode == 0


def test_a_read_only_cache_folder_costs_a_warning_not_the_answer(bundle, pdf, tmp_path):
    cache = tmp_path / "cache"
    if os.geteuid() == 0:  # root writes through permission bits: a read-only file system instead
        if not mount_tmpfs(cache, "ro,size=1m"):
            pytest.skip("running as root without the right to mount a read-only tmpfs")
    else:
        cache.mkdir()
        cache.chmod(0o555)
    try:
        assert_answered_with_one_warning(ask(bundle, pdf, cache=cache))
        assert files_under(cache) == set()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(cache)], check=False)
        else:
            cache.chmod(0o755)


def test_a_full_disk_costs_a_warning_not_the_answer(bundle, pdf, tmp_path):
    cache = tmp_path / "cache"
    if not mount_tmpfs(cache, "size=64k"):  # a real file system with no space: ENOSPC
        pytest.skip("needs root to mount a tiny tmpfs; the file-size-limit test covers the same path")
    try:
        completed = ask(bundle, pdf, cache=cache)
        assert_answered_with_one_warning(completed)
        assert "No space left on device" in completed.stderr, completed.stderr
        assert no_partial_files(cache), files_under(cache)
    finally:
        subprocess.run(["umount", str(cache)], check=False)


def _limit_file_size() -> None:
    # Every write past 32 KiB fails with EFBIG (instead of killing the process): the cache entries
    # are larger, the marker file is not.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))


def test_a_file_size_limit_costs_a_warning_not_the_answer(bundle, pdf, tmp_path):
    cache = tmp_path / "cache"
    assert_answered_with_one_warning(ask(bundle, pdf, cache=cache, preexec_fn=_limit_file_size))
    assert no_partial_files(cache), files_under(cache)
    assert entries(cache_info(cache)) == {"tokens": 0, "llm-prefix": 0}


# -- two processes sharing the cache --

READER = textwrap.dedent("""
    import json, sys, time, zlib
    from fila_cli.caches.folder import CacheFolder
    from fila_cli.llm.prefix_store import PrefixStore
    store, key, deadline = PrefixStore(CacheFolder()), sys.argv[1], time.monotonic() + float(sys.argv[2])
    expected = {int(c) for c in sys.argv[3].split(",")}
    hits = misses = 0
    while time.monotonic() < deadline:
        state = store.get(key)
        if state is None:
            misses += 1
            continue
        assert zlib.crc32(state.data) in expected, "a state that was never written was served"
        hits += 1
    print(json.dumps({"hits": hits, "misses": misses}))
""")

WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from fila_cli.caches.folder import CacheFolder
    from fila_cli.llm.backend import PrefixState
    from fila_cli.llm.prefix_store import PrefixStore
    store, key, deadline = PrefixStore(CacheFolder()), sys.argv[1], time.monotonic() + float(sys.argv[2])
    states = [PrefixState(np.load(path), np.arange(7, dtype=np.intc), 7, 0) for path in sys.argv[3:]]
    i = 0
    while time.monotonic() < deadline:
        store.put(key, states[i % 2])  # replaced under the reader
        time.sleep(0.005)
        store.discard(key)  # and removed under it, as another process's eviction does
        time.sleep(0.002)
        i += 1
    print(i)
""")


def test_two_processes_sharing_the_cache_never_crash_each_other(tmp_path):
    """One process replaces and removes an entry while another reads it: each read is the whole of
    one written entry or a miss, and the reader never fails."""
    import hashlib
    import zlib

    import numpy as np

    rng = np.random.default_rng(0)
    paths, crcs = [], []
    for i in range(2):  # large enough that a read takes a while
        data = rng.integers(0, 256, 24 * 1024 * 1024, dtype=np.uint8)
        np.save(tmp_path / f"state{i}.npy", data)
        paths.append(str(tmp_path / f"state{i}.npy"))
        crcs.append(str(zlib.crc32(data)))
    key, seconds = hashlib.sha256(b"page").hexdigest(), "6"
    env = {**os.environ, "FILA_CACHE_DIR": str(tmp_path / "cache")}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, key, seconds, *paths], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    reader = subprocess.run([sys.executable, "-c", READER, key, seconds, ",".join(crcs)], env=env, capture_output=True,
                            text=True, timeout=120)
    written, writer_errors = writer.communicate(timeout=120)
    assert writer.returncode == 0, writer_errors
    assert reader.returncode == 0, reader.stderr
    counts = json.loads(reader.stdout)
    assert counts["hits"] > 0 and counts["misses"] > 0 and int(written) > 10, (counts, written)
