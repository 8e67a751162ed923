"""Level 5: what is built on the library: analyses, baselines, pictures, the bundled digits
example, the demo, result files and the command line (``cli``, level 6 inside this package).

May import: every level below (``core`` to ``truth``). The library never imports this package.
"""
