"""Package discovery, which pyproject.toml cannot express: the Alembic environment lives at the top of
the repository (``db/``) and ships inside the package as ``switcher.migrations``. Both trees are found,
not listed, so a new subpackage cannot be left out of the wheel."""

from setuptools import find_packages, setup

MIGRATIONS = "switcher.migrations"

setup(
    packages=[
        *find_packages(include=["switcher", "switcher.*"]),
        MIGRATIONS,
        *(f"{MIGRATIONS}.{package}" for package in find_packages("db")),
    ],
    package_dir={MIGRATIONS: "db"},
)
