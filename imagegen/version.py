"""The package version, in a module of its own: the modules that stamp it on what they write (run
folders, stores, ONNX files) read it here without importing the package root, which imports everything."""

__version__ = "0.1.0"
