"""The package version, importable without importing the package root (which registers
the transformers Auto classes)."""
__version__ = "0.1.0"
