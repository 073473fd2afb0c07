# Cimport entry point for embedders: `from zeroline cimport Stream` (with
# include_path=[zeroline.get_include()]). It only re-exports the public C API declared, with its
# contracts (GIL needs, error sentinels, pointer lifetimes), in zeroline/_core.pxd; using it needs
# the compiled zeroline._core at run time.
from zeroline._core cimport Stream, Receiver, zl_cutter, zl_framer, zl_buffer
