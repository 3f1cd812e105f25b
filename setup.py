"""Build and install arpo.

`pip install -e .` compiles the C++ extension `arpo._C` (the KV block manager, csrc/) with pybind11 when a C++17
compiler and the Python headers are present. Set ARPO_NO_EXT=1 to skip it: the package then uses its pure-Python
twin, with identical behaviour.
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("ARPO_NO_EXT", "0") not in ("1", "true", "yes"):
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules.append(
        Pybind11Extension("arpo._C", sources, cxx_std=17, extra_compile_args=["-O2"])
    )
    cmdclass["build_ext"] = build_ext

setup(
    name="arpo",
    version="0.1.0",
    description="Compact, GPU-efficient trainer and decoder for ARPO (Agentic Reinforced Policy Optimization)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["arpo", "arpo.*", "arpo_kernels", "arpo_kernels.*"]),
    package_data={"arpo": ["data/embedded/*", "configs/*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "triton>=3.0",
        "transformers>=4.45",
        "safetensors",
        "numpy",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "tokenizers", "bm25s", "sympy",
                 "math-verify", "datasets", "matplotlib", "tensorboard", "fastapi", "uvicorn", "pydantic", "httpx",
                 "openai", "pexpect", "mcp", "aiohttp", "httptools", "uvloop; sys_platform != 'win32'"],
        "serve": ["fastapi", "uvicorn", "pydantic", "httpx", "httptools", "uvloop; sys_platform != 'win32'"],
        "bench": ["aiohttp", "pytest-benchmark"],
        "tools": ["bm25s", "sympy", "math-verify", "datasets", "matplotlib", "tensorboard", "mcp"],
        "mcp": ["mcp"],
        "plot": ["matplotlib", "tensorboard"],
        "gpu": ["flash-attn", "xformers", "liger-kernel"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["arpo=arpo.cli:main"]},
    zip_safe=False,
)
