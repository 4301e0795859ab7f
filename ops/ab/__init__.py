"""`promptcache ab`: does the optimizer make better pictures? A prompt set is generated raw and
optimised through the configured generator, each image scored (BRISQUE; CLIP similarity when a
CLIP model is on disk), and the paired differences reported with a confidence interval.

Its packages are the optional `ab` extra; this module imports none of them, so the command can
say how to install them (`missing_extra`). The work is in `command`, `run`, `scores`, `stats`.
"""

from __future__ import annotations

import argparse
from importlib.util import find_spec
from pathlib import Path

INSTALL_HINT = ("promptcache ab needs the `ab` extra (BRISQUE, scikit-image, SciPy, LIBSVM, "
                "OpenCV): .venv/bin/pip install -e '.[ab]' (or pip install 'promptcache[ab]')")
# import name -> distribution, for the message
_NEEDED = {"brisque": "brisque", "cv2": "opencv-python-headless", "scipy": "scipy",
           "skimage": "scikit-image", "libsvm": "libsvm-official"}


def missing_extra() -> list[str]:
    """The `ab` extra's distributions that are not installed."""
    return [dist for module, dist in _NEEDED.items() if find_spec(module) is None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`promptcache ab`'s options (the parser itself is made in consumers/cli.py)."""
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="one prompt a line, or .json / .tsv / .csv with a prompt column "
                             "(default: a sample of ../shared/data/prompts, else the packaged "
                             "sample)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="a seeded sample of N prompts (default 20 of the default set; all "
                             "of a --prompts file)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the sample, the image seeds (one per prompt, the same for "
                             "both arms) and the bootstrap (default 0)")
    parser.add_argument("--baseline", choices=["verbatim", "plain"], default="verbatim",
                        help="raw arm: the prompt as typed (verbatim, default) or what the "
                             "service sends with options.optimize off (plain)")
    parser.add_argument("--ci", choices=["t", "bootstrap"], default="t",
                        help="95%% interval of the paired mean difference (default t)")
    parser.add_argument("--clip-model", default=None, metavar="PATH",
                        help="a saved transformers CLIP model (directory or cached name) for "
                             "prompt-image similarity; never downloaded")
    parser.add_argument("--no-clip", action="store_true", help="skip CLIP similarity")
    parser.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="images generated at once (default "
                             "PROMPTCACHE_GENERATION_CONCURRENCY)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a generation param for every image, e.g. --param width=512")
    parser.add_argument("--save-images", type=Path, default=None, metavar="DIR",
                        help="write every image to DIR as NNNN-raw.png / NNNN-optimised.png")
    parser.add_argument("--json", action="store_true", help="the whole report as JSON")
