"""Print the ``[project] dependencies`` of a pyproject.toml, one requirement per line.

The Dockerfiles install these in a layer of their own before copying the bm6b source, so a code
change does not reinstall torch. Standard library only: it runs before anything is installed.
"""

import sys
import tomllib


def main(path: str) -> int:
    with open(path, "rb") as handle:
        project = tomllib.load(handle)["project"]
    for requirement in project["dependencies"]:
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))
