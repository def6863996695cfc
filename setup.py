"""Installs vitoken: `pip install -e .[test]` (CPU), `.[gpu]` or `.[tpu]`.

In a runtime that already has a working JAX (Colab, a TPU VM image), keep it:
`VITOKEN_KEEP_JAX=1 pip install -e .` leaves jax and jaxlib out of the requirements.
"""
import os
import pathlib
import re

import setuptools

_ROOT = pathlib.Path(__file__).parent
_VERSION = re.search(r'__version__ = "([^"]+)"',
                     (_ROOT / "vitoken" / "__init__.py").read_text()).group(1)

# Ranges that are known to work together; widen only after running the suite.
_JAX = ["jax>=0.10.0,<0.12", "jaxlib>=0.10.0,<0.12"]
_KEEP_JAX = os.environ.get("VITOKEN_KEEP_JAX", "").lower() in ("1", "true", "yes")
_INSTALL_REQUIRES = ([] if _KEEP_JAX else _JAX) + [
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11.20,<0.13",
    "ml-collections>=1.0,<2",
    "tensorflow-datasets>=4.9.7,<5",
    "array-record>=0.7,<0.9",
    "grain>=0.2.12,<0.3",
    "numpy>=1.26,<3",
    "pillow>=10",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "absl-py>=2",
    "scikit-learn>=1.4",  # ships the UCI digits that cluttered digits is built from
    "tensorboardX>=2.6,<3",  # writes the TensorBoard event files
    # gs:// workdirs and data without TensorFlow: etils.epath reads buckets through gcsfs, and
    # orbax lists and deletes checkpoints in a bucket with google-cloud-storage.
    "gcsfs>=2024.2",
    "google-cloud-storage>=2.14",
]

_EXTRAS = {
    # torch 2.13.0 is the CPU wheel; torchvision/timm are only the parity reference.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "torchvision==0.28.0",
        "timm>=1.0.15,<2",
        "nbclient>=0.10",
        "nbformat>=5.9",
        "ipykernel>=6.29",
        "tensorboard>=2.16",  # an independent reader for the event files the trainer writes
        "ruff>=0.6,<1",  # the linter .ci/run runs before the tests (ruff.toml)
    ],
    "gpu": ["jax[cuda12]>=0.10.0,<0.12"],
    "gpu-cuda13": ["jax[cuda13]>=0.10.0,<0.12"],
    "tpu": ["jax[tpu]>=0.10.0,<0.12"],
}

setuptools.setup(
    name="vitoken",
    version=_VERSION,
    description="Vision Transformers that spend compute only on the tokens that matter (JAX/Flax).",
    long_description=(_ROOT / "README.md").read_text() if (_ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["vitoken", "vitoken.*"]),
    python_requires=">=3.10",
    install_requires=_INSTALL_REQUIRES,
    extras_require=_EXTRAS,
    license="Apache-2.0",
    license_files=["LICENSE"],
)
