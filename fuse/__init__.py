"""FUSE protocol layer (sans-IO): wire ABI, transport protocol, FileSystem interface, Server.

Imports nothing else from pyvmm: ``Server.handle(reader, writer)`` takes request bytes through a
``fuse.io.Reader`` and writes the reply through a ``fuse.io.Writer``, calling a
``fuse.filesystem.FileSystem`` in between.
"""
