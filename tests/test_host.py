"""host.reuse_freed_memory: a program's large temporary stops being faulted in at every call."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# Prints whether the setting applied, then the page faults of each of 8 calls of a program whose
# temporary (x @ y, 64 MiB) is above glibc's largest mmap threshold (32 MiB), so that by default
# every call maps it afresh. The first 20 calls let the heap grow to its steady size.
_SCRIPT = """
import resource, sys
from xattn_vlm.train import host
print(host.reuse_freed_memory() if sys.argv[1] == "reuse" else False)
import jax
import jax.numpy as jnp
x, y, z = jnp.ones((8192, 8)), jnp.ones((8, 2048)), jnp.ones((8192, 1))
program = jax.jit(lambda x, y, z: (x @ y).T @ z)
for _ in range(20):
  program(x, y, z).block_until_ready()
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  program(x, y, z).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults_per_call(mode: str) -> tuple[bool, list[int]]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True, timeout=120).stdout.split()
  return out[0] == "True", sorted(int(n) for n in out[1:])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_the_temporary_is_faulted_in_once_instead_of_at_every_call():
  applied, plain = _page_faults_per_call("plain")
  assert not applied
  pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
  assert plain[4] >= 0.9 * pages, plain  # without it, every call maps the temporary afresh
  applied, reused = _page_faults_per_call("reuse")
  assert applied
  assert reused[4] <= 0.01 * pages, reused
