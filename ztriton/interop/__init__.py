"""Interoperability: NIR export and import (`to_nir`, `from_nir`; DESIGN.md section 10). The nir
package is optional: it is imported when a function needs it (pip install "ztriton[interop]")."""

from .nir import DEFAULT_DT, SUBTRACT_RESETS, from_nir, to_nir

__all__ = ["DEFAULT_DT", "SUBTRACT_RESETS", "from_nir", "to_nir"]
