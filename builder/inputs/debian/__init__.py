"""Debian packages straight from the archive, in pure Python (no apt, no dpkg, no root).

Modules: ``mirror`` (which archive URL), ``archive`` (InRelease, Packages, .debs),
``deb`` (ar + tar extraction). Nothing is imported here, to keep CLI start-up fast.
"""
