"""Install the top-level folders storage/, stages/, pipeline/ as kdcache.storage, ..., and
facade/ as the ``kdcache`` package itself (the stable public names: ``kdcache.CacheReader``).

Every folder with an ``__init__.py`` below them becomes a package, so a new sub-folder can
never be left out of the wheel silently (tests/test_packaging.py checks the wheel's file list).
The facade folder is not called kdcache/: a folder of that name at the root would shadow the
installed package for code run from here.
"""

import os

from setuptools import setup

TOP_LEVEL = ("storage", "stages", "pipeline")

packages: list[str] = ["kdcache"]
package_dir: dict[str, str] = {"kdcache": "facade"}
for top in TOP_LEVEL:
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        if "__init__.py" in filenames:
            name = "kdcache." + dirpath.replace(os.sep, ".")
            packages.append(name)
            package_dir[name] = dirpath

setup(packages=packages, package_dir=package_dir)
