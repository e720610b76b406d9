"""Install the top-level folders storage/, stages/, pipeline/ as kdcache.storage, ...

Every folder with an ``__init__.py`` below them becomes a package, so a new sub-folder can
never be left out of the wheel silently (tests/test_packaging.py checks the wheel's file list).
"""

import os

from setuptools import setup

TOP_LEVEL = ("storage", "stages", "pipeline")

packages: list[str] = []
package_dir: dict[str, str] = {}
for top in TOP_LEVEL:
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        if "__init__.py" in filenames:
            name = "kdcache." + dirpath.replace(os.sep, ".")
            packages.append(name)
            package_dir[name] = dirpath

setup(packages=packages, package_dir=package_dir, package_data={"kdcache.pipeline": ["*.yaml"]})
