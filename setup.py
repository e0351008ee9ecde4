"""The one compiled part: retrieval._flatscan, the exact search's fused distance + top-k scan
(retrieval/flatscan.py). Optional: where it does not compile, the install goes on and exact search
uses FAISS's flat scan. Everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("retrieval._flatscan", ["retrieval/_flatscan.c"],
                             extra_compile_args=["-O3", "-std=c99", "-Wno-psabi"], optional=True)])
