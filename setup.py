"""The package list; everything else is in pyproject.toml.

`[tool.setuptools.packages.find]` only finds folders under `lightning_nas/`, and the recipes and
callback presets live at the top of the repository (mapped in `package-dir`), so the list is the
found Python packages plus those data packages.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["lightning_nas*"]),
                "lightning_nas.recipes", "lightning_nas.recipes.fragments", "lightning_nas.presets"])
