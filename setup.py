"""Build script: setup.cfg holds the metadata and dependencies; this only lists the packages.

``packages = find:`` in setup.cfg cannot add ``hpc_jobs.templates``, the repository's top-level
``templates/`` directory shipped as a subpackage (setup.cfg's ``package_dir`` maps it), so the list
is made here: the core (``hpc_jobs``), the shipped workflows (``launchers``, ``models``, ``data``)
and the templates.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["hpc_jobs", "hpc_jobs.*", "launchers", "launchers.*", "models", "models.*",
                                    "data", "data.*"])
    + ["hpc_jobs.templates"],
)
