"""``python -m automedseg`` (also what ``torchrun -m automedseg train ...`` runs)."""

from automedseg.cli import main

if __name__ == "__main__":
    main(prog_name="automedseg")
