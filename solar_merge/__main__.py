"""`python -m solar_merge ...` is `solar-merge ...`: what `accelerate launch -m solar_merge
train ...` runs on every process (solar_merge.stages.launch starts it that way)."""

from solar_merge.cli import main

if __name__ == "__main__":
    main(prog_name="solar-merge")
