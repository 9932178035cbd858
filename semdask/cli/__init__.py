"""Command-line interface: thin click commands over the public functions.

Nothing in the library imports this package.
"""
