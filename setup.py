"""Build the compiled caption rules; the project's metadata lives in pyproject.toml.

The extensions are optional: where no C compiler is found, setuptools skips them and bm6b runs
the pure-Python rules, which give the same results more slowly (``bm6b.filters.speedups``).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILED = ["bm6b.filters._translate_fast", "bm6b.filters._caption_fast"]

extensions = cythonize([Extension(name, [name.replace(".", "/") + ".pyx"]) for name in COMPILED],
                       compiler_directives={"language_level": 3}, quiet=True)
for extension in extensions:
    # Set after cythonize, which builds new Extension objects without the flag. An optional
    # extension that fails to compile is skipped with a warning instead of failing the install.
    extension.optional = True

setup(ext_modules=extensions)
