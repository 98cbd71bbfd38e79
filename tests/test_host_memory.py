"""The so3lib command's allocator setting (`so3lib.cli.host_memory`): taken by glibc, skipped where the user set
glibc's malloc tunables or asked for the system allocator, and the memory it hands out still works."""

import ctypes
import ctypes.util
import platform
import subprocess
import sys

import pytest

from so3lib.cli.host_memory import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize(
    "env", [{"SO3LIB_MALLOC": "system"}, {"MALLOC_MMAP_MAX_": "8"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}]
)
def test_the_users_own_setting_wins(env):
    assert keep_freed_memory(env) is False


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_glibc_takes_it_and_large_blocks_come_from_the_heap():
    """In a fresh process: mallopt accepts both settings; a 64 MiB block is then heap memory (below the program
    break), not a fresh mapping, and freeing and allocating it again hands back usable memory."""
    code = """
import ctypes
import ctypes.util
from so3lib.cli.host_memory import keep_freed_memory
assert keep_freed_memory({})
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.sbrk.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_ssize_t], [ctypes.c_void_p]
p = libc.malloc(64 << 20)
assert p and p < libc.sbrk(0), "a 64 MiB block was mapped, not taken from the heap"
ctypes.memset(p, 1, 64 << 20)
libc.free(p)
q = libc.malloc(64 << 20)
ctypes.memset(q, 2, 64 << 20)
assert ctypes.string_at(q + (32 << 20), 4) == b"\\x02" * 4
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_without_glibc_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert keep_freed_memory({}) is False
