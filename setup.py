"""Builds the one C piece of hvsim: the instruction-counting hook of cpu/ (see hypervisor/cpu/_icount.c)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("hypervisor.cpu._icount", ["hypervisor/cpu/_icount.c"])])
