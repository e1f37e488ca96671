"""Build the spectral shift shipped with the toy world (the quickstart's second subject, composed with the first).

Trains the dotted square with the identifier "zwx" on the bundled pipeline, with the quickstart's recipe, and copies
the shift into src/svdiff_adapter/toyworld/assets/shifts/dotted_square/. Rebuild it whenever the bundled pipeline
changes: a shift carries its base model's fingerprint and is refused by another base.

    python examples/toyworld/make_shipped_shift.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from svdiff_adapter import toyworld as tw
from svdiff_adapter.format import DEFAULT_WEIGHT_NAME
from svdiff_adapter.toyworld.personalize import ShiftRecipe, train_subject_shift


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", default="dotted_square")
    parser.add_argument("--identifier", default="zwx")
    parser.add_argument("--max_train_steps", type=int, default=ShiftRecipe.max_train_steps)
    parser.add_argument("--out", type=Path, default=tw.ASSETS_DIR / "shifts")
    args = parser.parse_args()
    subject = tw.get_subject(args.subject)
    with tempfile.TemporaryDirectory() as work:
        run = train_subject_shift(subject, work, recipe=ShiftRecipe(max_train_steps=args.max_train_steps),
                                  identifier=args.identifier)
        target = args.out / subject.name
        target.mkdir(parents=True, exist_ok=True)
        temporary = target / f".{DEFAULT_WEIGHT_NAME}.tmp"
        shutil.copy2(run / DEFAULT_WEIGHT_NAME, temporary)
        os.replace(temporary, target / DEFAULT_WEIGHT_NAME)  # atomic: never a half-written shipped file
    print(f"shipped shift written to {target / DEFAULT_WEIGHT_NAME}")


if __name__ == "__main__":
    main()
