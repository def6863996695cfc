"""Test-wide JAX setup (8 fake CPU devices for the mesh tests, a persistent compile cache) and
the two test tiers.

  python -m pytest -q -n 2 tests                   # everything (CI)
  python -m pytest -q -n 2 -m "not slow" tests     # the fast tier: every module's numerics
  python -m pytest -q -n 2 -m slow tests           # only what the fast tier leaves out

`slow` is assigned here, not in the test files (see `tiers.py` for the lists and why each
entry is there), and slow tests are collected first: under xdist the long ones start early
instead of lengthening the tail.
"""
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
import tiers  # noqa: E402  pylint: disable=wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)
_CACHE = os.environ.get(
    "VITOKEN_TEST_JAX_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "vitoken", "jax-test-cache"))
os.makedirs(_CACHE, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Every compile is cached, also the many small eager ones (inits, reference math). On 2 cores
# that took the warm fast tier from 3m38s (only compiles over 0.2 s cached) to 2m09s-2m17s; an
# empty cache's first fast-tier run took 6m01s and wrote ~6k entries (~45 MB). Editing vitoken
# changes programs, hence keys, and old entries stay (154 MB here after a session of edits
# and full runs): delete the folder to reclaim them.
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ.get("VITOKEN_TEST_JAX_CACHE_MIN_COMPILE_SECS", "0")))
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Fixtures that train a run, fit a tokenizer or run `python -m vitoken.train`: every test that
# uses one is slow. Defined (with the other lists) in tiers.py.
TRAINED_RUN_FIXTURES = tiers.TRAINED_RUN_FIXTURES


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: trains a run, fits a tokenizer, runs subprocesses or is among the "
                 "longest tests (see tests/tiers.py); -m 'not slow' runs the fast tier")


def pytest_collection_modifyitems(config, items):
  for item in items:
    if tiers.is_slow(item.nodeid, item.fixturenames):
      item.add_marker("slow")
  # Slow first (stable, so files keep their order within each tier): with xdist the long
  # tests start at once and the short ones fill in around them.
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
