"""The kernel families, one folder each (kernel.py, space.py, spec.py, ops.py), and the toolbox
they share (common/). `loader` imports every family and lists the registered specs; this package
imports nothing, so that no family, and no part of the core, reaches the loader by importing it."""
