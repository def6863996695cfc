"""Test-wide JAX setup: 8 fake CPU devices (mesh tests) and a persistent compile cache."""
import os

import jax

jax.config.update("jax_num_cpu_devices", 8)
_CACHE = os.environ.get("VITOKEN_TEST_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "vitoken", "jax-test-cache"))
os.makedirs(_CACHE, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
